"""The process model read from /proc: mappings, identity (pid + start time), tasks, state.

Everything here parses text the kernel wrote; nothing stops or changes a process.

A process is live while any of its threads is: a leader that called pthread_exit shows
as a zombie while its other threads run on, and the kernel then answers an empty
/proc/PID/maps and ESRCH for /proc/PID/mem, pagemap and process_vm_readv of PID, because
the leader has no memory any more. Such a process is reached through one of its live
threads (`live_tid`, `ProcessIdentity.view`); its pid, start time and identity stay the
leader's, which cannot be reused while the zombie leader exists.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cpcoord.errors import NoSuchProcess, PermissionDenied, PidReused, ProcessExited
from cpcoord.ranges import AddressRange


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str  # e.g. "rw-p"
    offset: int
    dev: str  # "fd:01"
    inode: int
    path: str  # "" for anonymous; "[heap]", "[stack]", "/lib/...", "/memfd:x (deleted)"

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def deleted(self) -> bool:
        return self.path.endswith(" (deleted)")

    @property
    def is_regular_file(self) -> bool:
        """Backed by a named file on a filesystem (not anon, not [special], not memfd/shm)."""
        if not self.path.startswith("/") or self.inode == 0:
            return False
        return not (self.path.startswith("/memfd:") or self.path.startswith("/SYSV"))

    @property
    def range(self) -> AddressRange:
        return AddressRange(self.start, self.end)

    @property
    def size(self) -> int:
        return self.end - self.start

    @classmethod
    def parse(cls, line: str) -> Mapping:
        # "start-end perms offset dev inode   path"; the path may contain spaces.
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            raise ValueError(f"bad maps line: {line!r}")
        lo, _, hi = fields[0].partition("-")
        return cls(
            start=int(lo, 16),
            end=int(hi, 16),
            perms=fields[1],
            offset=int(fields[2], 16),
            dev=fields[3],
            inode=int(fields[4]),
            path=fields[5].rstrip("\n") if len(fields) > 5 else "",
        )

    def format(self) -> str:
        return (
            f"{self.start:x}-{self.end:x} {self.perms} {self.offset:08x} {self.dev} "
            f"{self.inode} {self.path}"
        ).rstrip()


# Parsed lines, by their text: a maps line names its mapping completely (addresses,
# permissions, offset, device, inode, path), and Mapping is immutable, so one parse
# serves every read that shows the same line again. A checkpoint reads the maps of a
# process with 20 000 mappings several times, and parsing is what costs (~3 us a line);
# a lookup is ~0.1 us. Bounded: cleared when it holds twice what one read shows.
_PARSED: dict[str, Mapping] = {}
_PARSED_MIN = 1 << 14


def parse_maps(text: str) -> list[Mapping]:
    lines = text.splitlines()
    if len(_PARSED) > max(_PARSED_MIN, 2 * len(lines)):
        _PARSED.clear()
    out = []
    for line in lines:
        m = _PARSED.get(line)
        if m is None:
            if not line.strip():
                continue
            m = _PARSED[line] = Mapping.parse(line)
        out.append(m)
    return out


@contextmanager
def _proc_errors(pid: int, what: str) -> Iterator[None]:
    """Translate OSError on /proc/PID/... into the cpcoord hierarchy."""
    try:
        yield
    except FileNotFoundError:
        raise NoSuchProcess(pid) from None
    except ProcessLookupError:
        raise NoSuchProcess(pid) from None
    except PermissionError as e:
        raise PermissionDenied(what, pid, e.strerror) from None
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise NoSuchProcess(pid) from None
        raise


def open_proc(pid: int, name: str, flags: int, action: str) -> int:
    """Open /proc/PID/`name` (close-on-exec): NoSuchProcess when the process is gone,
    PermissionDenied (`action`, e.g. "read pagemap of") when we may not."""
    try:
        return os.open(f"/proc/{pid}/{name}", flags | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(pid) from None
    except PermissionError as e:
        raise PermissionDenied(action, pid, e.strerror) from None


def read_maps_text(pid: int) -> str:
    with _proc_errors(pid, "read maps of"), open(f"/proc/{pid}/maps") as f:
        text = f.read()
    if not text:
        # No mm behind this pid: gone, or a zombie leader whose threads still run (their
        # maps are the process's); a live pid with no mm (a kernel thread) has none.
        tid = live_tid(pid)  # NoSuchProcess when it is gone
        if tid is not None and tid != pid:
            with _proc_errors(pid, "read maps of"), open(f"/proc/{tid}/maps") as f:
                text = f.read()
    return text


def read_maps(pid: int) -> list[Mapping]:
    return parse_maps(read_maps_text(pid))


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/PID/stat that cpcoord uses."""

    pid: int
    comm: str
    state: str
    start_time: int  # field 22, clock ticks after boot


def parse_stat(text: str) -> Stat:
    # comm is in parentheses and may itself contain ") ", so split at the last ')'.
    lparen, rparen = text.index("("), text.rindex(")")
    rest = text[rparen + 2 :].split()
    # rest[0] is field 3 (state); field 22 is rest[19].
    return Stat(
        pid=int(text[:lparen]),
        comm=text[lparen + 1 : rparen],
        state=rest[0],
        start_time=int(rest[19]),
    )


def read_stat(pid: int, tid: int | None = None) -> Stat:
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    with _proc_errors(pid, "read stat of"), open(path) as f:
        return parse_stat(f.read())


@dataclass(frozen=True)
class ProcessIdentity:
    """A process: the pid plus its start time, so a reused pid is never mistaken for it."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        if pid <= 0:
            raise NoSuchProcess(pid)
        return cls(pid, read_stat(pid).start_time)

    def check(self) -> None:
        """Raise NoSuchProcess or PidReused unless the pid still names this process."""
        now = read_stat(self.pid).start_time
        if now != self.start_time:
            raise PidReused(self.pid, self.start_time, now)

    def alive(self) -> bool:
        """Still this process, and some thread of it has not exited."""
        try:
            self.check()
            return live_tid(self.pid) is not None
        except (NoSuchProcess, PidReused):
            return False

    def view(self, during: str = "capture") -> int:
        """The pid to reach its memory through: its own, or a live thread's while its
        leader is a zombie. Raises PidReused, or ProcessExited when no thread lives."""
        try:
            self.check()
            tid = live_tid(self.pid)
        except NoSuchProcess:
            raise ProcessExited(self.pid, during) from None
        if tid is None:
            raise ProcessExited(self.pid, during)
        return tid


def list_tasks(pid: int) -> list[int]:
    """Thread ids of a process, sorted."""
    with _proc_errors(pid, "list threads of"):
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def live_tid(pid: int) -> int | None:
    """A thread of the process that has not exited: the pid itself unless its leader is
    a zombie, else the lowest live thread; None when every thread exited (a zombie).
    Raises NoSuchProcess when the pid does not exist."""
    if read_stat(pid).state not in ("Z", "X"):
        return pid
    for tid in list_tasks(pid):
        if tid == pid:
            continue
        try:
            if read_stat(pid, tid).state not in ("Z", "X"):
                return tid
        except NoSuchProcess:
            continue
    return None


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, D, T, t, Z, ...)."""
    return read_stat(pid).state


def task_states(pid: int) -> dict[int, str]:
    """State letter of each thread; threads that vanish while reading are left out."""
    out: dict[int, str] = {}
    for tid in list_tasks(pid):
        try:
            out[tid] = read_stat(pid, tid).state
        except NoSuchProcess:
            continue
    return out


def check_alive(ident: ProcessIdentity, during: str) -> None:
    """Raise ProcessExited when the process is gone or every thread of it exited (a
    zombie); a zombie leader whose other threads run is alive."""
    try:
        ident.check()
        tid = live_tid(ident.pid)
    except (NoSuchProcess, PidReused):
        raise ProcessExited(ident.pid, during) from None
    if tid is None:
        raise ProcessExited(ident.pid, during)
