"""Feature probing of every tracker backend, for `cpcoord check` and the agent's hello.

Owns the report: per backend whether it works on this kernel, why not, and the individual
checks behind the verdict (like `criu check`). Each verdict comes from the backend's own
self-test on a page of this process (softdirty.availability, uffd_avail.availability); the
finer checks here only explain a failure (which piece is missing), they never overrule it.

Backends, in the order they are listed: soft-dirty, uffd-wp (both kernel-assisted),
hash (always works, but reads every present page), full (always: every page every time).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from nodeagent.proc import uffd
from nodeagent.trackers import softdirty, uffd_avail
from nodeagent.trackers.base import Availability


@dataclass(frozen=True)
class Check:
    """One fact about the kernel that a backend depends on."""

    what: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class BackendReport:
    """A backend's verdict on this kernel, with the checks that explain it."""

    availability: Availability
    # Kernel-assisted: the kernel records writes, so a capture reads only changed pages.
    kernel_assisted: bool
    checks: tuple[Check, ...] = ()

    @property
    def name(self) -> str:
        return self.availability.name

    @property
    def available(self) -> bool:
        return self.availability.available

    @property
    def reason(self) -> str:
        return self.availability.reason

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "available": self.available,
            "kernel_assisted": self.kernel_assisted,
            "reason": self.reason,
            "checks": [{"what": c.what, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


def _guard(name: str, fn: Callable[[], Availability]) -> Availability:
    """Run a backend's self-test; an unexpected exception is a 'not available' with the
    exception as the reason, never a crash of `cpcoord check`."""
    try:
        return fn()
    except Exception as e:  # a probe must report, not raise
        return Availability(name, False, f"probe failed: {type(e).__name__}: {e}")


# -- soft-dirty ----------------------------------------------------------------------


def probe_soft_dirty() -> BackendReport:
    checks = []
    for f, mode in (("clear_refs", os.W_OK), ("pagemap", os.R_OK)):
        path = f"/proc/self/{f}"
        ok = os.access(path, mode)
        checks.append(Check(path, ok, "accessible" if ok else "missing or not accessible"))
    avail = _guard(softdirty.NAME, softdirty.availability)
    detail = "self-test on a page of our own" if avail.available else avail.reason
    checks.append(Check("write after clear_refs 4 sets pagemap bit 55", avail.available, detail))
    return BackendReport(avail, True, tuple(checks))


# -- uffd-wp -------------------------------------------------------------------------

# feature bit -> (name, first Linux release that has it)
_FEATURES = {
    uffd.UFFD_FEATURE_WP_ASYNC: ("UFFD_FEATURE_WP_ASYNC", "6.7"),
    uffd.UFFD_FEATURE_WP_UNPOPULATED: ("UFFD_FEATURE_WP_UNPOPULATED", "6.4"),
    uffd.UFFD_FEATURE_WP_HUGETLBFS_SHMEM: ("UFFD_FEATURE_WP_HUGETLBFS_SHMEM", "6.0"),
}

_USERFAULTFD_ERRORS = {
    errno.ENOSYS: "kernel built without CONFIG_USERFAULTFD",
    errno.EPERM: "not permitted (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE?)",
    errno.EINVAL: "kernel too old for UFFD_USER_MODE_ONLY (< 5.11)",
}


def pagemap_scan_supported() -> Check:
    """Whether /proc/PID/pagemap answers the PAGEMAP_SCAN ioctl (Linux >= 6.7): an empty
    range is a no-op where it exists and ENOTTY where it does not."""
    what = "PAGEMAP_SCAN ioctl on /proc/self/pagemap"
    arg = uffd.PmScanArg()
    arg.size = ctypes.sizeof(arg)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        uffd.ioctl(fd, uffd.PAGEMAP_SCAN, arg)
    except OSError as e:
        if e.errno == errno.ENOTTY:
            return Check(what, False, "not supported (needs Linux >= 6.7)")
        return Check(what, True, f"present (empty scan: {e.strerror})")
    finally:
        os.close(fd)
    return Check(what, True, "supported")


def probe_uffd_wp() -> BackendReport:
    checks: list[Check] = []
    try:
        feats = uffd.supported_features()
    except OSError as e:
        why = _USERFAULTFD_ERRORS.get(e.errno or 0, e.strerror or str(e))
        checks.append(Check("userfaultfd system call", False, why))
    else:
        checks.append(Check("userfaultfd system call", True, f"features 0x{feats:x}"))
        for bit, (fname, since) in _FEATURES.items():
            required = bool(bit & uffd.REQUIRED_FEATURES)
            have = bool(feats & bit)
            detail = ("required" if required else "optional") + (
                "" if have else f", missing (needs Linux >= {since})"
            )
            checks.append(Check(fname, have or not required, detail))
    try:
        checks.append(pagemap_scan_supported())
    except OSError as e:
        checks.append(Check("PAGEMAP_SCAN ioctl on /proc/self/pagemap", False, str(e)))
    avail = _guard("uffd-wp", uffd_avail.availability)
    prerequisites_ok = all(c.ok for c in checks)
    detail = "" if avail.available or not prerequisites_ok else avail.reason
    if not prerequisites_ok:
        detail = "not run: a check above failed"
    what = "self-test: a write to a write-protected page of our own is reported once"
    checks.append(Check(what, avail.available, detail))
    return BackendReport(avail, True, tuple(checks))


# -- always available ------------------------------------------------------------------


def probe_hash() -> BackendReport:
    return BackendReport(
        Availability(
            "hash", True, "always: compares a digest of every present page with the last capture"
        ),
        False,
    )


def probe_full() -> BackendReport:
    return BackendReport(Availability("full", True, "always: copies every present page"), False)


def probe_all() -> list[BackendReport]:
    """Every backend's report, in listing order."""
    return [probe_soft_dirty(), probe_uffd_wp(), probe_hash(), probe_full()]


def kernel_assisted(reports: list[BackendReport]) -> list[str]:
    """Names of the kernel-assisted backends that work here."""
    return [r.name for r in reports if r.kernel_assisted and r.available]
