"""Before a rollback in place: does the kernel side still agree with the memory of the cut?

A restore in place puts memory and registers back; the kernel side (open fds, file
offsets, bytes queued in pipes and sockets) stays as it is now. `compare(cut, now)` says
where the two disagree; `check(member, pid, cut, force)` reads the kernel side now
(nodeagent/proc/kstate.py), refuses with KernelStateChanged naming every fd that differs,
and logs the rest as warnings. With `force` everything is only warned.

The rule (docs/decisions.md, "Kernel state at the cut"): what the process reads after a
rollback must be what it would have read at the cut. So these refuse:
- an fd open at the cut and closed now, or open now and not at the cut, or naming
  another object (inode, mount) under the same number;
- a pipe's read end or a socket whose bytes queued for reading differ;
- a regular file or directory open for reading whose offset moved.
These only warn: output the process already made (a pipe's write end whose queue
differs, a socket's unsent bytes, the offset of a file open write-only), changed fd flags,
state the agent cannot see (eventfd, timerfd, epoll...: anon inodes), queues not known,
and a record that is partial or missing (a generation older than the record).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from cpcoord.errors import KernelStateChanged
from cpcoord.kstate import KernelFd, KernelState
from nodeagent.proc.kstate import read_kernel_state

log = logging.getLogger(__name__)
SHOWN = 6  # differences named in one refusal at most (the rest are counted)
_FLAGS_SEEN = ~(os.O_CLOEXEC | 0o100000)  # close-on-exec, O_LARGEFILE: no effect on reads


@dataclass(frozen=True)
class Verdict:
    refusals: tuple[str, ...]
    warnings: tuple[str, ...]


def _name(f: KernelFd) -> str:
    return f"fd {f.fd} ({f.target})"


def _compare_fd(cut: KernelFd, now: KernelFd, refuse: list[str], warn: list[str]) -> None:
    name = _name(cut)
    if not cut.same_object(now):
        refuse.append(f"{name} names {now.target} now")
        return
    if cut.kind in ("pipe", "socket"):
        if cut.unread is None or now.unread is None:
            warn.append(f"{name}: queued bytes not known")
        elif cut.unread != now.unread:
            what = f"{name}: {cut.unread} bytes unread at the cut, {now.unread} now"
            # The write end of a pipe: those bytes are the reader's input, not ours.
            (refuse if cut.kind == "socket" or cut.reads else warn).append(what)
        if cut.unsent is not None and now.unsent is not None and cut.unsent != now.unsent:
            warn.append(f"{name}: {cut.unsent} bytes unsent at the cut, {now.unsent} now")
    elif cut.kind in ("file", "dir") and cut.pos != now.pos:
        what = f"{name}: offset {cut.pos} at the cut, {now.pos} now"
        (refuse if cut.reads else warn).append(what)
    elif cut.kind == "anon":
        warn.append(f"{name}: its state is not compared")
    if (cut.flags & _FLAGS_SEEN) != (now.flags & _FLAGS_SEEN):
        warn.append(f"{name}: flags {cut.flags:o} at the cut, {now.flags:o} now")


def compare(cut: KernelState, now: KernelState) -> Verdict:
    """Where the kernel side now disagrees with the cut, refusals and warnings apart."""
    refuse: list[str] = []
    warn: list[str] = []
    then, here = cut.by_fd(), now.by_fd()
    for n in sorted(then.keys() | here.keys()):
        a, b = then.get(n), here.get(n)
        if a is None and b is not None:
            refuse.append(f"{_name(b)} was opened since the cut")
        elif b is None and a is not None:
            refuse.append(f"{_name(a)} was open at the cut and is closed now")
        elif a is not None and b is not None:
            _compare_fd(a, b, refuse, warn)
    for rec, when in ((cut, "at the cut"), (now, "now")):
        if rec.partial:
            warn.append(f"kernel side {when} partly known: {rec.partial}")
    return Verdict(tuple(refuse), tuple(warn))


def summary(lines: tuple[str, ...]) -> str:
    shown = "; ".join(lines[:SHOWN])
    more = len(lines) - SHOWN
    return f"{shown}; and {more} more" if more > 0 else shown


def check(
    member: str,
    pid: int,
    cut: KernelState | None,
    force: bool = False,
    read: Callable[[int], KernelState] = read_kernel_state,
) -> Verdict:
    """Refuse (KernelStateChanged) a rollback of the frozen `pid` that would leave its
    memory and its kernel side disagreeing, unless `force`; warnings are logged."""
    if cut is None:
        log.warning(
            "no record of the kernel side at the cut: restoring without comparing it",
            extra={"fields": {"member": member}},
        )
        return Verdict((), ("the generation has no record of the kernel side",))
    v = compare(cut, read(pid))
    if v.refusals and not force:
        raise KernelStateChanged(member, summary(v.refusals))
    for line in (*v.refusals, *v.warnings):
        fields = {"member": member, "difference": line, "forced": bool(v.refusals)}
        log.warning("kernel side differs from the cut", extra={"fields": fields})
    return v
