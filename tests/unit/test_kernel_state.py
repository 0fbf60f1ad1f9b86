"""The kernel side at the cut: reading it (this process's own fd table), carrying it
(proto and manifest round trips), and the rule that refuses a rollback (kernel_check)."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.store import manifest_io
from coordinator.store.manifest import Manifest, MemberMap, PageTable, RegionMap, ThreadRegs
from cpcoord import kstate
from cpcoord.cli import restore as cli
from cpcoord.errors import InvalidArgument, KernelStateChanged, RestoreRefused
from cpcoord.gen.v1 import agent_pb2, common_pb2
from cpcoord.kstate import KernelFd, KernelState
from nodeagent.daemon import restore_ops
from nodeagent.daemon.membership import HeldMember
from nodeagent.proc.kstate import read_kernel_state
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.restore import kernel_check

PIPE = "pipe:[77]"


def fd(
    n: int,
    target: str = PIPE,
    kind: str = "pipe",
    *,
    ino: int = 77,
    pos: int = 0,
    flags: int = 0,
    unread: int | None = None,
    unsent: int | None = None,
) -> KernelFd:
    return KernelFd(n, target, kind, pos, flags, ino, 0, unread, unsent)


def state(*fds: KernelFd, partial: str = "") -> KernelState:
    return KernelState(tuple(sorted(fds, key=lambda f: f.fd)), partial)


# -- reading ---------------------------------------------------------------------------


def test_reads_own_fds_offsets_and_queues(tmp_path: Path) -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    f = tmp_path / "data"
    f.write_bytes(b"x" * 100)
    fh = os.open(f, os.O_RDONLY)
    try:
        os.write(w, b"hello")
        a.send(b"1234567")
        os.lseek(fh, 42, os.SEEK_SET)
        got = read_kernel_state(os.getpid()).by_fd()
        assert got[r].kind == "pipe" and got[r].unread == 5 and got[r].reads
        assert got[w].kind == "pipe" and got[w].unread == 5 and not got[w].reads
        assert got[r].target == os.readlink(f"/proc/self/fd/{r}") and got[r].ino > 0
        assert got[b.fileno()].kind == "socket" and got[b.fileno()].unread == 7
        assert got[a.fileno()].unsent is not None and got[a.fileno()].unsent > 0
        assert got[fh].kind == "file" and got[fh].pos == 42 and got[fh].target == str(f)
        assert got[fh].flags & os.O_ACCMODE == os.O_RDONLY
    finally:
        for x in (r, w, fh):
            os.close(x)
        a.close()
        b.close()


def test_queues_bounded() -> None:
    r, w = os.pipe()
    try:
        got = read_kernel_state(os.getpid(), max_queues=0)
        assert got.by_fd()[r].unread is None
        assert "queues of only the first 0" in got.partial
    finally:
        os.close(r)
        os.close(w)


# -- carrying --------------------------------------------------------------------------

fds_st = st.lists(
    st.builds(
        KernelFd,
        fd=st.integers(0, 1 << 20),
        target=st.text(max_size=40),
        kind=st.sampled_from(kstate.KINDS),
        pos=st.integers(0, (1 << 64) - 1),
        flags=st.integers(0, (1 << 32) - 1),
        ino=st.integers(0, (1 << 64) - 1),
        mnt_id=st.integers(0, (1 << 32) - 1),
        unread=st.none() | st.integers(0, 1 << 40),
        unsent=st.none() | st.integers(0, 1 << 40),
    ),
    max_size=20,
    unique_by=lambda f: f.fd,
).map(lambda fs: KernelState(tuple(sorted(fs, key=lambda f: f.fd))))


@given(fds_st)
def test_proto_round_trip(s: KernelState) -> None:
    assert kstate.from_proto(kstate.to_proto(s)) == s


def test_bad_record_refused() -> None:
    with pytest.raises(InvalidArgument, match="sorted"):
        state(fd(3), fd(4)).__class__((fd(4), fd(3))).check()
    with pytest.raises(InvalidArgument, match="kind"):
        KernelState((fd(3, kind="weird"),)).check()


def test_manifest_keeps_kernel_state_and_old_ones_have_none() -> None:
    t = PageTable(
        np.array([0], np.uint64),
        np.array([1], np.uint32),
        np.array([0], np.uint32),
        np.zeros(1, "V32"),
    )
    reg = RegionMap("r", 0x10000, 0x11000, t)
    th = (ThreadRegs(5, "x86_64", b"\1" * 8, b""),)
    ks = state(fd(3, unread=12), fd(1, "/dev/null", "other", ino=9, pos=3))
    m = Manifest("j", 1, None, 1, 4096, (MemberMap("a", (reg,), th, ks), MemberMap("b", (reg,))))
    back = manifest_io.decode(manifest_io.encode(m))
    assert back.member("a").kernel == ks
    assert back.member("b").kernel is None


# -- the rule --------------------------------------------------------------------------


def test_same_kernel_side_passes() -> None:
    s = state(fd(3, unread=12), fd(4, unread=12, flags=os.O_WRONLY))
    assert kernel_check.compare(s, s) == kernel_check.Verdict((), ())


def test_pipe_drained_refused_write_end_only_warned() -> None:
    cut = state(fd(3, unread=12), fd(4, unread=12, flags=os.O_WRONLY))
    now = state(fd(3, unread=0), fd(4, unread=0, flags=os.O_WRONLY))
    v = kernel_check.compare(cut, now)
    assert v.refusals == (f"fd 3 ({PIPE}): 12 bytes unread at the cut, 0 now",)
    assert v.warnings == (f"fd 4 ({PIPE}): 12 bytes unread at the cut, 0 now",)


def test_data_arrived_since_refused() -> None:
    v = kernel_check.compare(state(fd(3, unread=0)), state(fd(3, unread=5)))
    assert v.refusals == (f"fd 3 ({PIPE}): 0 bytes unread at the cut, 5 now",)


def test_socket_input_refused_unsent_warned() -> None:
    s = "socket:[9]"
    cut = state(fd(5, s, "socket", ino=9, flags=os.O_RDWR, unread=0, unsent=100))
    now = state(fd(5, s, "socket", ino=9, flags=os.O_RDWR, unread=3, unsent=0))
    v = kernel_check.compare(cut, now)
    assert v.refusals == (f"fd 5 ({s}): 0 bytes unread at the cut, 3 now",)
    assert v.warnings == (f"fd 5 ({s}): 100 bytes unsent at the cut, 0 now",)


def test_fds_opened_closed_replaced_refused() -> None:
    cut = state(fd(3), fd(4, "/a", "file", ino=1))
    now = state(fd(4, "/b", "file", ino=2), fd(7, "/dev/null", "other", ino=5))
    v = kernel_check.compare(cut, now)
    assert v.refusals == (
        f"fd 3 ({PIPE}) was open at the cut and is closed now",
        "fd 4 (/a) names /b now",
        "fd 7 (/dev/null) was opened since the cut",
    )


def test_offsets_refused_when_read_warned_when_written() -> None:
    cut = state(
        fd(3, "/in", "file", ino=1, pos=0),
        fd(4, "/log", "file", ino=2, pos=10, flags=os.O_WRONLY | os.O_APPEND),
        fd(5, "/rw", "file", ino=3, pos=0, flags=os.O_RDWR),
        fd(6, "/dev/null", "other", ino=4, pos=0),
    )
    now = state(
        fd(3, "/in", "file", ino=1, pos=4096),
        fd(4, "/log", "file", ino=2, pos=99, flags=os.O_WRONLY | os.O_APPEND),
        fd(5, "/rw", "file", ino=3, pos=8, flags=os.O_RDWR),
        fd(6, "/dev/null", "other", ino=4, pos=77),
    )
    v = kernel_check.compare(cut, now)
    assert v.refusals == (
        "fd 3 (/in): offset 0 at the cut, 4096 now",
        "fd 5 (/rw): offset 0 at the cut, 8 now",
    )
    assert v.warnings == ("fd 4 (/log): offset 10 at the cut, 99 now",)


def test_renamed_file_is_the_same_object() -> None:
    v = kernel_check.compare(
        state(fd(3, "/a", "file", ino=1)), state(fd(3, "/a (deleted)", "file", ino=1))
    )
    assert v == kernel_check.Verdict((), ())


def test_unknown_and_partial_only_warned() -> None:
    cut = state(fd(3, unread=None), fd(8, "anon_inode:[eventfd]", "anon", ino=1), partial="x")
    v = kernel_check.compare(
        cut, state(fd(3, unread=4), fd(8, "anon_inode:[eventfd]", "anon", ino=1))
    )
    assert v.refusals == ()
    assert len(v.warnings) == 3


def test_check_refuses_names_and_counts_and_force_warns() -> None:
    cut = state(*(fd(n, unread=1) for n in range(3, 13)))
    now = state(*(fd(n, unread=0) for n in range(3, 13)))
    with pytest.raises(KernelStateChanged) as e:
        kernel_check.check("m", 1, cut, read=lambda pid: now)
    assert isinstance(e.value, RestoreRefused)
    msg = str(e.value)
    assert msg.startswith("cannot restore member m in place: kernel side changed: fd 3 (")
    assert msg.count("bytes unread") == kernel_check.SHOWN and "and 4 more" in msg
    assert "--force" in msg
    v = kernel_check.check("m", 1, cut, force=True, read=lambda pid: now)
    assert len(v.refusals) == 10


def test_no_record_restores_with_a_warning() -> None:
    def never(pid: int) -> KernelState:
        raise AssertionError("not read without a record")

    v = kernel_check.check("m", 1, None, read=never)
    assert v.refusals == () and v.warnings


# -- carried to the fit check and asked for on the command line ------------------------


def test_restore_freeze_brings_kernel_state_and_force() -> None:
    ks = state(fd(3, unread=12))
    lay = agent_pb2.RestoreLayout(member="w", kernel=kstate.to_proto(ks))
    old = agent_pb2.RestoreLayout(member="o")
    bad = agent_pb2.RestoreLayout(member="b", kernel=kstate.to_proto(KernelState((fd(-1),))))
    f = agent_pb2.Freeze(
        job="j",
        generation=1,
        kind=common_pb2.OPERATION_KIND_RESTORE,
        members=["w", "o", "b"],
        layouts=[lay, old, bad],
        force=True,
    )
    layouts = restore_ops.layouts_of(f)

    def held(name: str) -> HeldMember:
        return HeldMember("j", name, ProcessIdentity(1, 1), None)

    got = restore_ops.layout_of(held("w"), layouts)
    assert got.kernel == ks and got.force
    assert restore_ops.layout_of(held("o"), layouts).kernel is None
    with pytest.raises(InvalidArgument, match="out of range"):
        restore_ops.layout_of(held("b"), layouts)


def test_cli_force_in_place_only() -> None:
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    assert cli.request(p.parse_args(["--job", "j", "--force"])).force
    assert not cli.request(p.parse_args(["--job", "j"])).force
    with pytest.raises(InvalidArgument, match="--force"):
        cli.request(p.parse_args(["--job", "j", "--member", "m", "--into", "5", "--force"]))
