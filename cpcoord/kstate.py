"""The kernel side of a process at a cut, as values shared by agent and coordinator.

A whole-memory member's memory depends on kernel state that a restore in place does not
roll back: which fds are open and what they name, the file offsets, the bytes queued in
pipes and sockets. The agent reads it while the member is frozen for a capture
(nodeagent/proc/kstate.py), the coordinator keeps it in the manifest
(manifest.proto KernelState), and a restore compares it with the kernel side now
(nodeagent/restore/kernel_check.py). This module owns the values, their checks and their
proto form; nothing here reads /proc.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from cpcoord.errors import InvalidArgument
from cpcoord.gen.v1 import manifest_pb2 as pb

KINDS = ("file", "dir", "pipe", "socket", "anon", "other")
MAX_FDS = 1 << 14  # fds recorded per member at most: bounds the frozen time (bench/kstate.py)
MAX_TARGET = 4096  # bytes of one readlink target (PATH_MAX)


@dataclass(frozen=True)
class KernelFd:
    """One open fd at the cut (manifest.proto KernelFd)."""

    fd: int
    target: str  # readlink of /proc/PID/fd/N
    kind: str  # one of KINDS
    pos: int = 0
    flags: int = 0
    ino: int = 0
    mnt_id: int = 0
    unread: int | None = None  # pipes and sockets: bytes queued for reading
    unsent: int | None = None  # sockets: bytes written, not yet sent or acknowledged

    @property
    def accmode(self) -> int:
        return self.flags & os.O_ACCMODE

    @property
    def reads(self) -> bool:
        """Open for reading: what it yields next is input the memory expects."""
        return self.accmode in (os.O_RDONLY, os.O_RDWR)

    @property
    def appends(self) -> bool:
        return bool(self.flags & os.O_APPEND)

    def same_object(self, other: KernelFd) -> bool:
        """Whether both name the same open object (inode and mount, else the target)."""
        if self.ino and other.ino:
            return (self.ino, self.mnt_id, self.kind) == (other.ino, other.mnt_id, other.kind)
        return self.target == other.target

    def problem(self) -> str:
        if not 0 <= self.fd < 1 << 31:
            return f"fd {self.fd} out of range"
        if self.kind not in KINDS:
            return f"fd {self.fd}: unknown kind {self.kind!r}"
        if len(self.target.encode(errors="surrogateescape")) > MAX_TARGET:
            return f"fd {self.fd}: target longer than {MAX_TARGET} bytes"
        for name in ("pos", "flags", "ino", "mnt_id", "unread", "unsent"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1 << 64:
                return f"fd {self.fd}: {name} out of range"
        return ""


@dataclass(frozen=True)
class KernelState:
    """Every open fd of a process at the cut, by number; `partial` says what is missing."""

    fds: tuple[KernelFd, ...]
    partial: str = ""

    def by_fd(self) -> dict[int, KernelFd]:
        return {f.fd: f for f in self.fds}

    def check(self) -> KernelState:
        """Itself, or InvalidArgument when it cannot be a process's fd table."""
        if len(self.fds) > MAX_FDS:
            raise InvalidArgument(f"kernel state lists {len(self.fds)} fds (at most {MAX_FDS})")
        nums = [f.fd for f in self.fds]
        if nums != sorted(set(nums)):
            raise InvalidArgument("kernel state fds are not sorted and unique")
        for f in self.fds:
            if why := f.problem():
                raise InvalidArgument(f"kernel state: {why}")
        return self


def to_proto(s: KernelState) -> pb.KernelState:
    out = pb.KernelState(partial=s.partial)
    for f in s.fds:
        m = out.fds.add(
            fd=f.fd,
            target=f.target,
            kind=f.kind,
            pos=f.pos,
            flags=f.flags,
            ino=f.ino,
            mnt_id=f.mnt_id,
        )
        if f.unread is not None:
            m.unread = f.unread
        if f.unsent is not None:
            m.unsent = f.unsent
    return out


def from_proto(m: pb.KernelState) -> KernelState:
    """Checked: InvalidArgument for a record that cannot be a process's fd table."""
    return KernelState(tuple(_fd(f) for f in m.fds), m.partial).check()


def _fd(f: pb.KernelFd) -> KernelFd:
    return KernelFd(
        fd=f.fd,
        target=f.target,
        kind=f.kind,
        pos=f.pos,
        flags=f.flags,
        ino=f.ino,
        mnt_id=f.mnt_id,
        unread=f.unread if f.HasField("unread") else None,
        unsent=f.unsent if f.HasField("unsent") else None,
    )


def of_message(parent: object, field: str = "kernel") -> KernelState | None:
    """The kernel state a message carries in `field`, or None when unset (older peers,
    explicit regions)."""
    if not parent.HasField(field):  # type: ignore[attr-defined]
        return None
    return from_proto(getattr(parent, field))


def describe(fds: Iterable[KernelFd]) -> str:
    """For logs: how many fds of each kind."""
    counts: dict[str, int] = {}
    for f in fds:
        counts[f.kind] = counts.get(f.kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no fds"
