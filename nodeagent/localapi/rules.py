"""The agent's local API: what a process on this node may ask of the agent, and who may ask.

Owns the request rules of docs/local-api.md: argument checks, the permission rule, and
the calls into a `LocalBackend` (implemented by the agent: membership, registration,
checkpoint, restore). The socket side (SO_PEERCRED, framing, threads) lives in
nodeagent/localapi/server.py; this module does no I/O of its own, so the rules are
tested directly.

The permission rule: the caller is the process the kernel names (SO_PEERCRED), never
one a request names. A caller acts on itself and on its own job only: it registers
itself, checkpoints itself or its job, restores its own regions. Only root (uid 0) may
name another process (`pid`) or another job. A non-root caller may register as a member
only if no other user owns that member or any member of that job, so it can never be
handed another user's pages by claiming their member's name.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from typing import Any, Protocol

from cpcoord import __version__
from cpcoord.errors import (
    CpcoordError,
    InvalidArgument,
    LocalApiError,
    NoSuchProcess,
    NotAMember,
    NotPermitted,
)
from cpcoord.local_wire import PROTOCOL, error_reply
from cpcoord.ranges import PAGE_SIZE, check_name, user_space_end
from nodeagent.proc.procfs import ProcessIdentity

log = logging.getLogger(__name__)
MAX_REGIONS = 1024


@dataclass(frozen=True)
class Caller:
    """The process at the other end of a connection, as the kernel reported it."""

    process: ProcessIdentity
    uid: int
    gid: int

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def root(self) -> bool:
        return self.uid == 0


@dataclass(frozen=True)
class Membership:
    job: str
    member: str
    uid: int  # owner: the uid of the process that registered (or was attached as) it


@dataclass(frozen=True)
class LocalRegion:
    """A region as a process registered it: `size` bytes at a page-aligned `addr`.
    Captured as whole pages `[start, end)`; restored as exactly `size` bytes."""

    name: str
    addr: int
    size: int

    @property
    def start(self) -> int:
        return self.addr

    @property
    def end(self) -> int:
        return (self.addr + self.size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


@dataclass(frozen=True)
class Registration:
    """A register request the rules let through: `process` (owned by `uid`) is to be
    member `member` of `job`, with `regions` added or replacing those of the same name."""

    process: ProcessIdentity
    uid: int
    job: str
    member: str
    regions: tuple[LocalRegion, ...]


@dataclass(frozen=True)
class RestoreRequest:
    """A restore request the rules let through: the named regions of `process` (None:
    all it registered) from the generation (None: the latest committed)."""

    process: ProcessIdentity
    membership: Membership
    names: tuple[str, ...] | None
    generation: int | None


@dataclass(frozen=True)
class LocalRestoreResult:
    job: str
    member: str
    generation: int
    regions: tuple[tuple[str, int], ...]  # (name, bytes written)


class LocalBackend(Protocol):
    """What the agent provides behind the socket. Calls may block (a checkpoint waits for
    its commit) and come from several threads at once."""

    def membership(self, process: ProcessIdentity) -> Membership | None:
        """The job and member this live process is, if any."""
        ...

    def job_owners(self, job: str) -> MappingABC[str, int]:
        """Member name -> owner uid for every member the job has had; {} if unknown."""
        ...

    def register(self, r: Registration) -> Membership:
        """Make the process the member (a restarted process takes over a member whose
        process is gone; a live one raises DuplicateMember) and add or replace its
        regions by name."""
        ...

    def unregister(self, process: ProcessIdentity, names: Sequence[str]) -> None:
        """Forget these regions of the process (RegionNotRegistered if one is unknown)."""
        ...

    def checkpoint_member(self, process: ProcessIdentity, membership: Membership) -> int:
        """Checkpoint this member (a generation of its job that holds at least this
        member's pages at one cut); the generation number once it is committed."""
        ...

    def checkpoint_job(self, job: str) -> int:
        """Checkpoint every member of the job; the generation once committed."""
        ...

    def restore(self, r: RestoreRequest) -> LocalRestoreResult:
        """Write the named regions of the generation into the process, where it
        registered them now."""
        ...


# (pid) -> (identity, uid of the process); reads /proc in the real server.
Identify = Callable[[int], tuple[ProcessIdentity, int]]


def uid_of(pid: int) -> int | None:
    """The effective uid of process `pid`; None when it cannot be read (it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except OSError:
        pass
    return None


def identify(pid: int) -> tuple[ProcessIdentity, int]:
    ident = ProcessIdentity.of(pid)
    uid = uid_of(pid)
    if uid is None:
        raise NoSuchProcess(pid)
    return ident, uid


def _int(req: dict[str, Any], key: str, default: int | None = None) -> int | None:
    v = req.get(key, default)
    if v is None:
        return None
    if isinstance(v, str) and v.lower().startswith("0x"):
        try:
            return int(v, 16)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidArgument(f"{key} must be an integer, got {v!r}")
    return v


def _str(req: dict[str, Any], key: str) -> str | None:
    v = req.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise InvalidArgument(f"{key} must be a string")
    return check_name(v)


def _names(req: dict[str, Any], key: str = "regions") -> list[str] | None:
    v = req.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > MAX_REGIONS:
        raise InvalidArgument(f"{key} must be a list of at most {MAX_REGIONS} names")
    out = [check_name(n) if isinstance(n, str) else "" for n in v]
    if "" in out:
        raise InvalidArgument(f"{key} must hold names (strings)")
    return out


def parse_regions(req: dict[str, Any]) -> list[LocalRegion]:
    items = req.get("regions")
    if not isinstance(items, list) or not items or len(items) > MAX_REGIONS:
        raise InvalidArgument(f"regions must be a list of 1..{MAX_REGIONS} objects")
    out: list[LocalRegion] = []
    for d in items:
        if not isinstance(d, dict):
            raise InvalidArgument("each region must be {name, addr, size}")
        name = _str(d, "name")
        addr, size = _int(d, "addr"), _int(d, "size")
        if name is None or addr is None or size is None:
            raise InvalidArgument("each region needs name, addr and size")
        r = LocalRegion(name, addr, size)
        if size <= 0 or addr < 0 or r.end > user_space_end() + PAGE_SIZE:
            raise InvalidArgument(f"region {name}: {size} bytes at 0x{addr:x} is not valid")
        if addr % PAGE_SIZE:
            raise InvalidArgument(
                f"region {name} starts at 0x{addr:x}, not on a page boundary "
                f"({PAGE_SIZE} bytes): allocate it page-aligned (mmap, posix_memalign, "
                "cpcoord.client.zeros)"
            )
        out.append(r)
    ordered = sorted(out, key=lambda r: r.start)
    for a, b in itertools.pairwise(ordered):
        if b.start < a.end:
            raise InvalidArgument(f"regions {a.name} and {b.name} share a page")
    if len({r.name for r in out}) != len(out):
        raise InvalidArgument("a region name appears twice")
    return out


class LocalApi:
    """Requests (decoded JSON objects) from a caller -> replies, under the rules above."""

    def __init__(self, backend: LocalBackend, identify_pid: Identify = identify) -> None:
        self.backend = backend
        self._identify = identify_pid

    def handle(self, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
        """Never raises: errors become error replies (unexpected ones are logged)."""
        t0 = time.perf_counter()
        op = req.get("op")
        try:
            if req.get("v", PROTOCOL) != PROTOCOL:
                raise LocalApiError(f"protocol version {req.get('v')!r}; this agent speaks 1")
            fn = {
                "hello": self._hello,
                "register": self._register,
                "unregister": self._unregister,
                "checkpoint": self._checkpoint,
                "restore": self._restore,
            }.get(op if isinstance(op, str) else "")
            if fn is None:
                raise LocalApiError(f"unknown op {op!r}")
            reply = {"ok": True, **fn(caller, req)}
        except CpcoordError as e:
            reply = error_reply(e)
        except Exception as e:  # a backend bug must not kill the connection thread
            log.exception("local API request failed", extra={"fields": {"op": op}})
            reply = error_reply(CpcoordError(f"internal error in the agent ({type(e).__name__})"))
        log.info(
            "local API request",
            extra={
                "fields": {
                    "op": op,
                    "pid": caller.pid,
                    "uid": caller.uid,
                    "ok": reply["ok"],
                    "error": reply.get("error", ""),
                    "ms": round((time.perf_counter() - t0) * 1e3, 3),
                }
            },
        )
        return reply

    # -- who ---------------------------------------------------------------------------

    def _target(
        self, caller: Caller, req: dict[str, Any], what: str
    ) -> tuple[ProcessIdentity, int]:
        """The process a request acts on: the caller, or (root only) the one `pid` names."""
        pid = _int(req, "pid")
        if pid is None or pid == caller.pid:
            caller.process.check()
            return caller.process, caller.uid
        if not caller.root:
            raise NotPermitted(f"{what} pid {pid}", caller.pid, caller.uid)
        return self._identify(pid)

    def _member(self, caller: Caller, process: ProcessIdentity) -> Membership:
        m = self.backend.membership(process)
        if m is None:
            raise NotAMember(process.pid)
        return m

    # -- ops ---------------------------------------------------------------------------

    def _hello(self, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
        m = self.backend.membership(caller.process)
        return {
            "protocol": PROTOCOL,
            "version": __version__,
            "pid": caller.pid,
            "uid": caller.uid,
            "gid": caller.gid,
            "page_size": PAGE_SIZE,
            "job": m.job if m else None,
            "member": m.member if m else None,
        }

    def _register(self, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
        process, uid = self._target(caller, req, "register")
        regions = parse_regions(req)
        job, member = _str(req, "job"), _str(req, "member")
        now = self.backend.membership(process)
        if now is not None:
            if (job or now.job, member or now.member) != (now.job, now.member):
                raise InvalidArgument(
                    f"pid {process.pid} is already member {now.member} of job {now.job}"
                )
            job, member = now.job, now.member
        if job is None or member is None:
            raise InvalidArgument("register needs a job and a member name (or CPCOORD_JOB/_MEMBER)")
        if not caller.root:
            owners = self.backend.job_owners(job)
            if owners.get(member, uid) != uid:
                raise NotPermitted(f"register as member {member} of job {job}", caller.pid, uid)
            if any(o != uid for o in owners.values()):
                raise NotPermitted(f"join job {job} of another user", caller.pid, uid)
        m = self.backend.register(Registration(process, uid, job, member, tuple(regions)))
        return {
            "job": m.job,
            "member": m.member,
            "regions": [
                {"name": r.name, "addr": r.addr, "size": r.size, "start": r.start, "end": r.end}
                for r in regions
            ],
        }

    def _unregister(self, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
        process, _ = self._target(caller, req, "unregister regions of")
        names = _names(req)
        if not names:
            raise InvalidArgument("unregister needs regions: [names]")
        self._member(caller, process)
        self.backend.unregister(process, names)
        return {}

    def _checkpoint(self, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
        scope = req.get("scope", "self")
        if scope == "job":
            job = _str(req, "job")
            own = self.backend.membership(caller.process)
            if job is None:
                if own is None:
                    raise NotAMember(caller.pid)
                job = own.job
            elif not caller.root and (own is None or own.job != job):
                raise NotPermitted(f"checkpoint job {job}", caller.pid, caller.uid)
            return {"job": job, "generation": self.backend.checkpoint_job(job)}
        if scope != "self":
            raise InvalidArgument(f"scope must be 'self' or 'job', got {scope!r}")
        process, _ = self._target(caller, req, "checkpoint")
        m = self._member(caller, process)
        return {
            "job": m.job,
            "member": m.member,
            "generation": self.backend.checkpoint_member(process, m),
        }

    def _restore(self, caller: Caller, req: dict[str, Any]) -> dict[str, Any]:
        process, _ = self._target(caller, req, "restore")
        names = _names(req) or None
        generation = _int(req, "generation")
        if generation is not None and generation < 0:
            raise InvalidArgument("generation must be >= 0 (0: the latest)")
        m = self._member(caller, process)
        wanted = tuple(names) if names else None
        r = self.backend.restore(RestoreRequest(process, m, wanted, generation or None))
        return {
            "job": r.job,
            "member": r.member,
            "generation": r.generation,
            "regions": [{"name": n, "bytes": b} for n, b in r.regions],
            "bytes": sum(b for _, b in r.regions),
        }
