"""The local API's Unix socket: accept, learn the caller from the kernel, serve frames.

Owns the socket file (created mode 0666 in a 0755 directory: every local process may
connect; what it may do is decided per request by nodeagent.localapi.rules), one thread per
connection, and the caller's identity: pid, uid and gid from SO_PEERCRED at connect
time, pinned to the process with SO_PEERPIDFD (Linux >= 6.5) so that a caller which
exits before we look at it can never be confused with a process that reuses its pid.
Requests never name the caller.

    server = LocalApiServer("/run/cpcoord/agent.sock", backend)
    server.start()            # returns at once; threads serve until close()
    ...
    server.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import struct
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from cpcoord.errors import (
    CpcoordError,
    LocalApiError,
    LocalApiSocketUnservable,
    NoSuchProcess,
    PidReused,
)
from cpcoord.local_wire import encode, error_reply, read_body, read_length
from nodeagent.localapi.rules import Caller, LocalApi, LocalBackend
from nodeagent.proc.procfs import ProcessIdentity

log = logging.getLogger(__name__)
SO_PEERPIDFD = 77  # Linux 6.5; not in Python 3.11's socket module
_UCRED = struct.Struct("3i")


def peer_caller(conn: socket.socket) -> Caller:
    """The connected process, from the kernel. Raises NoSuchProcess when it is gone."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    if pid <= 0:
        raise NoSuchProcess(pid)
    pidfd = -1
    with contextlib.suppress(OSError):
        pidfd = struct.unpack("i", conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    try:
        ident = ProcessIdentity.of(pid)
        # The pidfd turns readable once its process exits; while it has not, the pid
        # cannot have been reused, so the start time just read is the caller's.
        if pidfd >= 0 and select.select([pidfd], [], [], 0)[0]:
            raise NoSuchProcess(pid)
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    return Caller(ident, uid, gid)


class LocalApiServer:
    """Serves the local API on a Unix stream socket, one thread per connection."""

    def __init__(
        self,
        path: str | Path,
        backend: LocalBackend,
        *,
        mode: int = 0o666,
        max_connections: int = 256,
        frame_timeout: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self.api = LocalApi(backend)
        self.mode = mode
        self.frame_timeout = frame_timeout  # a frame once begun must arrive this fast
        self._slots = threading.BoundedSemaphore(max_connections)
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._acceptor: threading.Thread | None = None

    # -- lifetime ----------------------------------------------------------------------

    def start(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as e:
            raise LocalApiSocketUnservable(str(self.path), e.strerror or str(e)) from None
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, self.mode)
            sock.listen(64)
            sock.settimeout(0.25)  # so the accept loop notices close()
        except OSError as e:
            sock.close()
            raise LocalApiSocketUnservable(str(self.path), e.strerror or str(e)) from None
        self._sock = sock
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="localapi-accept", daemon=True
        )
        self._acceptor.start()
        log.info("local API listening", extra={"fields": {"socket": str(self.path)}})

    def _clear_stale(self) -> None:
        """Remove a socket file left by a dead agent; refuse a live one or a non-socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise LocalApiError(f"{self.path} exists and is not a socket: not removing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink(missing_ok=True)  # nobody listens: stale
            return
        finally:
            probe.close()
        raise LocalApiError(f"{self.path} is served by another running agent")

    def close(self) -> None:
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.join()
            self._acceptor = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.path.unlink(missing_ok=True)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
        for t in threads:
            t.join(timeout=5)

    def __enter__(self) -> LocalApiServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- serving -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                raise
            if not self._slots.acquire(blocking=False):
                self._refuse(conn, LocalApiError("too many connections to the agent"))
                continue
            t = threading.Thread(
                target=self._serve, args=(conn,), name="localapi-conn", daemon=True
            )
            with self._lock:
                self._conns.add(conn)
                self._threads.add(t)
            t.start()

    def _refuse(self, conn: socket.socket, e: CpcoordError) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(1.0)
            conn.sendall(encode(error_reply(e)))
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(None)
            try:
                caller = peer_caller(conn)
            except (NoSuchProcess, OSError):
                return  # gone before we could see it: nothing to answer
            while not self._stop.is_set():
                reply, keep = self._one(conn, caller)
                if reply is None:
                    return
                conn.sendall(encode(reply))
                if not keep:
                    return  # a framing error: the stream can no longer be trusted
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()
            self._slots.release()

    def _one(self, conn: socket.socket, caller: Caller) -> tuple[dict[str, Any] | None, bool]:
        """Read and answer one request: (reply, keep the connection). No reply when the
        caller hung up or is gone."""
        try:
            n = read_length(conn)
            if n is None:
                return None, False
            conn.settimeout(self.frame_timeout)
            req = read_body(conn, n)
            conn.settimeout(None)
        except LocalApiError as e:
            return error_reply(e), False
        except TimeoutError:
            return error_reply(LocalApiError(f"frame not complete in {self.frame_timeout}s")), False
        try:
            caller.process.check()  # the caller of this connection is still that process
        except (NoSuchProcess, PidReused):
            return None, False  # it exited (the fd lives on elsewhere): serve nobody
        return self.api.handle(caller, req), True
