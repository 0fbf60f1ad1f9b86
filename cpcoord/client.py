"""The process-side library: register memory, checkpoint yourself or your job, restore.

    import numpy as np
    from cpcoord import client

    state = client.zeros((1024, 1024))        # page-aligned NumPy array
    client.register("state", state, job="train-42", member="rank-0")
    gen = client.checkpoint()                 # this process; returns once committed
    gen = client.checkpoint(job=True)         # every member of the job
    client.restore("state")                   # the latest generation's bytes, in place
    client.restore()                          # every registered region

It talks to the node agent over a Unix socket (docs/local-api.md): `CPCOORD_AGENT_SOCKET`,
else `/run/cpcoord/agent.sock`. Job and member default to `CPCOORD_JOB` and
`CPCOORD_MEMBER` (set by `cpcoord run`). The agent learns who calls from the kernel; a
process can act on itself and its own job only (unless it runs as root).

Regions: an address and a length, or any writable, C-contiguous object with the buffer
protocol (a NumPy array, `mmap`, `bytearray`). A region must start on a page boundary
(`zeros`/`empty` allocate such arrays; `mmap` always is); its length is free: it is
captured as whole pages, and exactly its bytes are written back, so a neighbour sharing
its last page is never touched. A registered buffer is pinned (a `bytearray` cannot be
resized, an `mmap` not closed) until `unregister`, because the agent writes into it.

Standard library only (NumPy is imported by `zeros`/`empty` alone), so it loads in any
Python process. Errors are the classes of cpcoord.errors, raised with the agent's message.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from cpcoord.closing import Closing
from cpcoord.errors import AgentSocketUnavailable, InvalidArgument, LocalApiError
from cpcoord.local_wire import PROTOCOL, encode, read_frame, remote_error, socket_path

PAGE_SIZE = mmap.PAGESIZE
JOB_ENV, MEMBER_ENV = "CPCOORD_JOB", "CPCOORD_MEMBER"


@dataclass(frozen=True)
class Region:
    """A registered region: `size` bytes at `address`."""

    name: str
    address: int
    size: int


@dataclass(frozen=True)
class Restored:
    generation: int
    regions: dict[str, int]  # name -> bytes written
    nbytes: int


def _buffer_span(obj: Any) -> tuple[int, int, memoryview]:
    """Address and length of a writable contiguous buffer, and the view pinning it."""
    try:
        mv = memoryview(obj)
    except TypeError:
        raise InvalidArgument(
            f"{type(obj).__name__} does not support the buffer protocol"
        ) from None
    if mv.readonly:
        raise InvalidArgument("a region must be writable (restore writes into it)")
    if not mv.c_contiguous:
        raise InvalidArgument("a region must be C-contiguous (one block of memory)")
    flat = mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv
    if flat.nbytes == 0:
        raise InvalidArgument("a region must not be empty")
    addr = ctypes.addressof(ctypes.c_char.from_buffer(flat))
    return addr, flat.nbytes, flat


class Client(Closing):
    """One connection to the local agent; thread-safe (one request at a time)."""

    def __init__(
        self,
        path: str | None = None,
        *,
        job: str | None = None,
        member: str | None = None,
        timeout: float | None = None,
    ) -> None:
        self.path = socket_path(path)
        self.job = job or os.environ.get(JOB_ENV) or None
        self.member = member or os.environ.get(MEMBER_ENV) or None
        self.timeout = timeout  # seconds per request; None waits (a checkpoint may be long)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._pins: dict[str, memoryview | None] = {}
        self.regions: dict[str, Region] = {}

    # -- transport ---------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.path)
            except OSError as e:
                s.close()
                raise AgentSocketUnavailable(self.path, e.strerror or str(e)) from None
            self._sock = s
        return self._sock

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return the reply's fields; raises the reply's error."""
        msg = {"v": PROTOCOL, "op": op, **{k: v for k, v in args.items() if v is not None}}
        with self._lock:
            s = self._connect()
            s.settimeout(self.timeout)
            try:
                s.sendall(encode(msg))
                reply = read_frame(s)
            except (OSError, LocalApiError) as e:
                self._drop()
                why = "timed out" if isinstance(e, TimeoutError) else str(e)
                raise AgentSocketUnavailable(self.path, why) from None
            if reply is None:
                self._drop()
                raise AgentSocketUnavailable(self.path, "the agent closed the connection")
        if not reply.get("ok"):
            raise remote_error(reply)
        return reply

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- API ---------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        """Who the agent thinks we are: pid, uid, job and member (None if not yet)."""
        return self.request("hello")

    def register(
        self,
        name: str,
        buffer: Any = None,
        *,
        address: int | None = None,
        size: int | None = None,
        job: str | None = None,
        member: str | None = None,
    ) -> Region:
        """Register (or replace) region `name`: a buffer object, or `address` + `size`."""
        pin: memoryview | None = None
        if buffer is not None:
            if address is not None or size is not None:
                raise InvalidArgument("give a buffer or address and size, not both")
            address, size, pin = _buffer_span(buffer)
        elif address is None or size is None:
            raise InvalidArgument("register needs a buffer, or address and size")
        if address % PAGE_SIZE:
            raise InvalidArgument(
                f"region {name!r} starts at 0x{address:x}, not on a page boundary: "
                "allocate it with cpcoord.client.zeros()/empty() or mmap"
            )
        job, member = job or self.job, member or self.member
        reply = self.request(
            "register",
            job=job,
            member=member,
            regions=[{"name": name, "addr": address, "size": size}],
        )
        self.job, self.member = reply["job"], reply["member"]
        region = Region(name, address, size)
        self.regions[name] = region
        self._pins[name] = pin
        return region

    def unregister(self, *names: str) -> None:
        self.request("unregister", regions=list(names))
        for n in names:
            self.regions.pop(n, None)
            self._pins.pop(n, None)

    def checkpoint(self, *, job: bool = False) -> int:
        """Checkpoint this process (or, `job=True`, its whole job); the generation number
        once it is committed."""
        reply = self.request("checkpoint", scope="job" if job else "self")
        return int(reply["generation"])

    def restore(self, *names: str, generation: int | None = None) -> Restored:
        """Write the named regions (none named: every registered one) back from a
        generation (default: the latest committed), into this process, where they are now."""
        reply = self.request("restore", regions=list(names) or None, generation=generation)
        regions = {r["name"]: int(r["bytes"]) for r in reply.get("regions", [])}
        return Restored(int(reply["generation"]), regions, int(reply.get("bytes", 0)))


# -- page-aligned arrays ------------------------------------------------------------------


def empty(shape: int | tuple[int, ...], dtype: Any = "float64") -> Any:
    """A NumPy array on its own private anonymous mapping: page-aligned, no page shared
    with other data. Private, like malloc'ed memory (mmap.mmap(-1, n) alone would be
    MAP_SHARED: a fork would share its writes, and a shared mapping is captured whole at
    every checkpoint since no tracker sees writes to it from other processes)."""
    import numpy as np

    dt = np.dtype(dtype)
    count = int(np.prod(shape))
    nbytes = max(count * dt.itemsize, 1)
    size = (nbytes + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mm, dtype=dt, count=count).reshape(shape)  # keeps mm alive


def zeros(shape: int | tuple[int, ...], dtype: Any = "float64") -> Any:
    """Like `empty`, zero-filled (fresh anonymous memory reads as zeros)."""
    return empty(shape, dtype)


# -- the process-wide default client -------------------------------------------------------

_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def register(name: str, buffer: Any = None, **kwargs: Any) -> Region:
    return default_client().register(name, buffer, **kwargs)


def unregister(*names: str) -> None:
    default_client().unregister(*names)


def checkpoint(*, job: bool = False) -> int:
    return default_client().checkpoint(job=job)


def restore(*names: str, generation: int | None = None) -> Restored:
    return default_client().restore(*names, generation=generation)


def hello() -> dict[str, Any]:
    return default_client().hello()
