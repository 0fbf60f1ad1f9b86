"""`cpcoord check` and the soft-dirty tracker on the host kernel, whatever it offers.

The verdicts are compared with an independent oracle: the running kernel's config
(/proc/config.gz or /boot/config-RELEASE) and its version. Inside the qemu guest the same
command is checked again with soft-dirty present (tests/kernel/guest/).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cpcoord import cli
from cpcoord.errors import NoKernelTracker, TrackerUnavailable
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity, read_maps
from nodeagent.trackers import probe
from nodeagent.trackers.base import Availability
from nodeagent.trackers.softdirty import SoftDirtyTracker, availability
from testbed.driver import Target
from tests.conftest import require

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def kernel_config() -> dict[str, str]:
    """CONFIG_X -> value of the running kernel; {} when no config is readable."""
    release = os.uname().release
    for path, gz in (("/proc/config.gz", True), (f"/boot/config-{release}", False)):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError:
            continue
        text = (gzip.decompress(raw) if gz else raw).decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("CONFIG_"):
                k, _, v = line.partition("=")
                out[k] = v
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                out[line.split()[1]] = "n"
        return out
    return {}


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpcoord", "check", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_json_agrees_with_kernel_config() -> None:
    cfg = kernel_config()
    require(bool(cfg), "kernel config not readable (/proc/config.gz, /boot/config-*)")
    r = run_check("--json")
    doc = json.loads(r.stdout)
    by = {t["name"]: t for t in doc["trackers"]}
    assert list(by) == ["soft-dirty", "uffd-wp", "hash", "full"]
    assert by["hash"]["available"] and by["full"]["available"]
    want_sd = cfg.get("CONFIG_MEM_SOFT_DIRTY") == "y"
    assert by["soft-dirty"]["available"] == want_sd, by["soft-dirty"]
    if not want_sd:
        assert "CONFIG_MEM_SOFT_DIRTY" in by["soft-dirty"]["reason"] or (
            "architecture" in by["soft-dirty"]["reason"]
        )
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    want_uffd = (
        cfg.get("CONFIG_USERFAULTFD") == "y"
        and cfg.get("CONFIG_PTE_MARKER_UFFD_WP") == "y"
        and (major, minor) >= (6, 7)
        and os.uname().machine == "x86_64"
    )
    assert by["uffd-wp"]["available"] == want_uffd, by["uffd-wp"]
    usable = [n for n in ("soft-dirty", "uffd-wp") if by[n]["available"]]
    assert doc["kernel_assisted"] == usable
    assert doc["ok"] == bool(usable)
    assert r.returncode == (0 if usable else NoKernelTracker.exit_code), r.stderr


def test_check_text_lists_every_tracker_and_why() -> None:
    r = run_check("-v")
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"kernel {os.uname().release}")
    for name in ("soft-dirty", "uffd-wp", "hash", "full"):
        assert any(ln.split()[:1] == [name] for ln in lines), r.stdout
    reports = {rep.name: rep for rep in probe.probe_all()}
    for name in ("soft-dirty", "uffd-wp"):
        rep = reports[name]
        line = next(ln for ln in lines if ln.split()[:1] == [name])
        assert line.split()[1] == ("yes" if rep.available else "no")
        assert rep.reason in line
        # -v lists the checks; a backend that is not available names a failed one.
        assert rep.available or any(not c.ok for c in rep.checks), rep


def test_check_fails_with_42_when_no_kernel_tracker(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable(name: str) -> Callable[[], probe.BackendReport]:
        return lambda: probe.BackendReport(Availability(name, False, f"{name} missing"), True)

    monkeypatch.setattr(probe, "probe_soft_dirty", unavailable("soft-dirty"))
    monkeypatch.setattr(probe, "probe_uffd_wp", unavailable("uffd-wp"))
    assert cli.main(["check", "--json"]) == 42
    out, err = capsys.readouterr()
    doc = json.loads(out)  # the report is still printed, complete
    assert doc["ok"] is False and doc["kernel_assisted"] == []
    assert "soft-dirty missing" in err and "uffd-wp missing" in err


def test_soft_dirty_tracker_on_this_kernel(target_factory: Callable[..., Target]) -> None:
    """Without soft-dirty, arming refuses with the probe's reason (a silent arm would make
    every later capture miss every page); with it, a written page is reported. Either way
    the target is thawed and keeps running."""
    t = target_factory(maps=["data:32"])
    tracker = SoftDirtyTracker()
    ident = ProcessIdentity.of(t.pid)
    avail = availability()
    if not avail.available:
        with frozen(ident) as fp, pytest.raises(TrackerUnavailable, match="soft-dirty"):
            tracker.arm(fp, read_maps(t.pid))
        assert tracker.armed is None
        t.assert_running()
        return
    with frozen(ident) as fp:
        tracker.arm(fp, read_maps(t.pid))
    t.cmd("write", name="data", page=3, count=1, counter=5)
    with frozen(ident) as fp:
        changed = tracker.collect(fp, read_maps(t.pid))
    t.assert_running()
    assert (t.mapping("data").page(3) >> 12) in set(changed.pages.tolist())
