"""The cooperating-process path: the target registers its own memory with
cpcoord.client_uffd; the agent's tracker (registration="self") never injects anything."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpcoord import client_uffd
from nodeagent.proc import uffd
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import Mapping, ProcessIdentity, read_maps
from nodeagent.trackers import uffd_avail, uffdwp
from nodeagent.trackers.uffdwp import UffdWpTracker
from tests.conftest import require

pytestmark = pytest.mark.integration
PAGE = 4096

TARGET = textwrap.dedent(
    """
    import ctypes, mmap, sys
    from cpcoord.client_uffd import SelfTracking
    bufs = [mmap.mmap(-1, n * 4096) for n in (8, 16)]
    for b in bufs:
        b.madvise(mmap.MADV_NOHUGEPAGE)
        for i in range(len(b) // 4096):
            b[i * 4096] = 1
    addrs = [ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in bufs]
    st = SelfTracking()
    st.register(addrs[0], len(bufs[0]))
    print("ready", *addrs, flush=True)
    for line in sys.stdin:
        op, *args = line.split()
        if op == "w":
            b, page = bufs[int(args[0])], int(args[1])
            b[page * 4096] = (b[page * 4096] + 1) % 256
        elif op == "reg":
            i = int(args[0])
            st.register(addrs[i], len(bufs[i]))
        elif op == "close":
            st.close()
        elif op == "q":
            break
        print("ok", flush=True)
    """
)


class SelfTarget:
    def __init__(self, tmp: Path) -> None:
        script = tmp / "selfreg.py"
        script.write_text(TARGET)
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        words = self.proc.stdout.readline().split()
        assert words[0] == "ready", words
        self.addrs = [int(a) for a in words[1:]]
        self.sizes = [8 * PAGE, 16 * PAGE]
        self.ident = ProcessIdentity.of(self.proc.pid)

    def cmd(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def mappings(self) -> list[Mapping]:
        spans = list(zip(self.addrs, self.sizes, strict=True))
        return [
            m
            for m in read_maps(self.proc.pid)
            if any(m.start < a + n and m.end > a for a, n in spans)
        ]

    def pages(self, i: int) -> list[int]:
        return list(range(self.addrs[i] // PAGE, (self.addrs[i] + self.sizes[i]) // PAGE))


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SelfTarget]:
    avail = uffd_avail.availability()
    require(avail.available, f"uffd-wp: {avail.reason}")

    def no_injection(*a: object, **k: object) -> None:
        raise AssertionError("registration='self' must never inject")

    monkeypatch.setattr(uffdwp, "Injector", no_injection)
    t = SelfTarget(tmp_path)
    yield t
    if t.proc.poll() is None:
        t.proc.kill()
        t.proc.wait()


def _collect(t: SelfTarget, tr: UffdWpTracker) -> list[int]:
    with frozen(t.ident) as fp:
        return [int(p) for p in tr.collect(fp, t.mappings()).pages]


def test_self_registered_process_is_tracked(target: SelfTarget) -> None:
    t = target
    tr = UffdWpTracker(registration="self")
    with frozen(t.ident) as fp:
        tr.arm(fp, t.mappings())
    assert tr.fd is None
    assert [(r.start, r.end) for r in tr.untracked] == [(t.addrs[1], t.addrs[1] + t.sizes[1])]
    assert set(tr.untracked.values()) == {"not registered by the process"}
    t.cmd("w 0 3")
    t.cmd("w 1 2")
    # The unregistered buffer counts as always changed.
    assert _collect(t, tr) == sorted([t.pages(0)[3], *t.pages(1)])
    assert _collect(t, tr) == t.pages(1)
    # Registered by the process between captures: every page it holds is reported once.
    t.cmd("reg 1")
    assert _collect(t, tr) == t.pages(1)
    assert tr.untracked == {}
    assert _collect(t, tr) == []
    t.cmd("w 1 5")
    t.cmd("w 0 7")
    assert _collect(t, tr) == sorted([t.pages(0)[7], t.pages(1)[5]])
    # The process stops tracking: everything is untracked, so always changed.
    t.cmd("close")
    assert _collect(t, tr) == sorted(t.pages(0) + t.pages(1))
    with frozen(t.ident) as fp:
        tr.forget(fp)
    t.proc.communicate("q\n", timeout=10)
    assert t.proc.returncode == 0


def test_client_abi_numbers_agree_with_the_agent() -> None:
    assert client_uffd._UFFDIO_API == uffd.UFFDIO_API
    assert client_uffd._UFFDIO_REGISTER == uffd.UFFDIO_REGISTER
    assert client_uffd._UFFDIO_UNREGISTER == uffd.UFFDIO_UNREGISTER
    assert client_uffd._WP_ASYNC == uffd.UFFD_FEATURE_WP_ASYNC
    assert client_uffd._WP_UNPOPULATED == uffd.UFFD_FEATURE_WP_UNPOPULATED
    assert client_uffd._NR_USERFAULTFD == uffd.NR_USERFAULTFD
