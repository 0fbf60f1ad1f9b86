"""Commands down the node agent's control stream, turned into work: ops for the ptrace
thread (nodeagent/daemon/worker.py), cancels for the uploader, and restore downloads.

Restore: a Prepare (nothing frozen) prefetches on a thread of its own what each member
will have written (nodeagent/daemon/prefetch.py: the ptrace thread peeks at the tracker,
`DownloadPages` with a page filter, off the stream's reader thread) and answers
Prepared, or Failed(RESTORE_FAILED); an Abort frees it. A Freeze of kind RESTORE
freezes and fits the members (Failed MISMATCH for one that cannot take the generation
back, then no Frozen); a Restore hands each member's prefetched pages (downloaded now
when there are none, from an older coordinator) to the ptrace thread, which fetches the
few pages written since, writes while the member stays frozen (Restored); the Thaw
thaws. RestoreInto downloads and writes into another process.

On the direct data path (the store opened at the Welcome) every download asks the
coordinator only where the chunks lie and reads the packs itself
(cpcoord/packread.py); when that read fails it logs why and downloads
through the coordinator, which checks every chunk again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

from cpcoord import __version__, grpcutil
from cpcoord.errors import CpcoordError, NotImplementedYet, StoreError
from cpcoord.gen.v1 import agent_pb2, common_pb2, types_pb2
from cpcoord.ranges import PAGE_SIZE
from nodeagent.daemon import cache_relay as relay
from nodeagent.daemon import prefetch, restore_live, restore_ops
from nodeagent.daemon import worker_ops as ops
from nodeagent.daemon.agent_session import Session
from nodeagent.daemon.membership import Members
from nodeagent.daemon.worker import Worker
from nodeagent.pages import PageNumbers
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.upload.direct import DirectStore
from nodeagent.upload.pool import Uploader

log = logging.getLogger(__name__)
# A Freeze asking for pre-copy with no time bound: the live passes' own bound.
PRECOPY_DEFAULT_MS = 2000
Emit = Callable[[agent_pb2.AgentMessage, int], None]
Contents = tuple[restore_ops.RegionContents, ...]
PEEK_TIMEOUT_S = 60.0  # the ptrace thread busy that long: write every page instead


class Commands:
    """Carries out what the coordinator sends on a session (`handle`, on the stream's
    reader thread: it never blocks)."""

    def __init__(
        self,
        worker: Worker,
        uploader: Uploader,
        members: Members,
        emit: Emit,
        coordinator: str,
        on_read: Callable[[str, int], None] | None = None,
    ) -> None:
        self.worker = worker
        self.uploader = uploader
        self.members = members
        self._emit = emit
        self._coordinator = coordinator  # for error messages
        self.prefetches = prefetch.Prefetches()
        self._read_bytes = on_read  # (path, bytes): restore reads, for the metrics

    def _on_read(self, path: str, n: int) -> None:
        if self._read_bytes is not None and n:
            self._read_bytes(path, n)

    def handle(self, s: Session, msg: agent_pb2.CoordinatorMessage) -> None:
        body = msg.WhichOneof("body")
        e = s.epoch
        if body == "heartbeat":
            s.heard_heartbeat = True
        elif body == "freeze":
            f = msg.freeze
            restoring = f.kind == common_pb2.OPERATION_KIND_RESTORE
            layouts = restore_ops.layouts_of(f) if restoring else ()
            members = tuple(f.members)
            pre_s = (f.precopy_ms or PRECOPY_DEFAULT_MS) / 1000 if f.precopy else 0.0
            live = self._live_scopes(f.job, f.generation, members, e) if restoring else ()
            op = ops.FreezeOp(
                f.job, f.generation, f.lease_ms, members, e, restoring, layouts, pre_s, f.full,
                live,
            )  # fmt: skip
            self.worker.submit(op)
        elif body == "capture":
            c = msg.capture
            self.worker.submit(ops.CaptureOp(c.job, c.generation, c.full, tuple(c.members), e))
        elif body == "prepare":
            self.prefetches.drop_stale(e)
            self._spawn("prepare", self._prepare, s, msg.prepare)
        elif body == "abort":
            a = msg.abort
            self.prefetches.drop(a.job, a.generation)
            log.info(
                "abort",
                extra={"fields": {"job": a.job, "generation": a.generation, "detail": a.detail}},
            )
            self.uploader.cancel(a.job, a.generation)
            self.worker.submit(ops.AbortOp(a.job, a.generation, e))
        elif body == "committed":
            self.worker.submit(ops.CommittedOp(msg.committed.job, msg.committed.generation))
            self.uploader.forget(msg.committed.job, msg.committed.generation)
        elif body == "thaw":
            self.worker.submit(ops.AbortOp(msg.thaw.job, msg.thaw.generation, e))
        elif body == "restore":
            r = msg.restore
            members = tuple(r.members) or tuple(m.name for m in self.members.of_job(r.job))
            self._spawn("restore", self._restore, s, r.job, r.generation, members)
        elif body == "attach_member":
            self.worker.submit(ops.AttachOp(msg.command_id, msg.attach_member, e))
        elif body == "detach_member":
            d = msg.detach_member
            self.worker.submit(ops.DetachOp(msg.command_id, d.job, d.member, e))
        elif body == "restore_into":
            self._spawn("restore-into", self._restore_into, s, msg.command_id, msg.restore_into)
        elif body == "read_cached":
            self._spawn("read-cached", self._read_cached, s, msg.command_id, msg.read_cached)
        elif body == "welcome":
            log.warning("a second Welcome ignored")
        else:  # a command newer than this agent
            err = NotImplementedYet(f"command {body or 'unknown'}", f"agent {__version__}")
            self._emit(ops.result(msg.command_id, err=err), e)

    # -- restore -----------------------------------------------------------------------------

    @staticmethod
    def _spawn(what: str, target: Callable[..., None], *args: object) -> None:
        """Download off the stream's reader thread; the ptrace thread writes."""
        threading.Thread(target=target, args=args, name=f"cpcoord-{what}", daemon=True).start()

    def _download(
        self, s: Session, job: str, gen: int, member: str, scope: prefetch.Scope | None = None
    ) -> tuple[Contents, CpcoordError | None, str]:
        """The member's pages (or the scope's), and the path they came by: "direct"
        (the store this agent opened at the Welcome; cpcoord/packread.py)
        when it has one, else, or when that read fails (logged with why), "coordinator"."""
        only = prefetch.page_filter(scope) if scope is not None else None
        store = s.limits.direct
        if store is not None:
            got, err, rpc_failed = self._download_by(s, job, gen, member, only, store)
            if err is None:
                return got, None, "direct"
            if rpc_failed:  # the coordinator did not answer: asking it again cannot help
                return (), err, "direct"
            fields = {"member": member, "store": store.location, "why": str(err)}
            log.warning(
                "direct read failed: reading through the coordinator", extra={"fields": fields}
            )
        got, err, _ = self._download_by(s, job, gen, member, only, None)
        return got, err, "coordinator"

    def _download_by(
        self,
        s: Session,
        job: str,
        gen: int,
        member: str,
        only: list[types_pb2.Region] | None,
        store: DirectStore | None,
    ) -> tuple[Contents, CpcoordError | None, bool]:
        """The download by one path: (contents, error, whether DownloadPages failed)."""
        path = "direct" if store is not None else "coordinator"
        held = self.members.get(job, member)
        local = held.recent if held is not None else None  # its last upload, in staging
        try:
            got = restore_ops.download(
                s.bulk, job, gen, member, s.limits.timeout_s, only, store,
                lambda n: self._on_read(path, n), local, lambda n: self._on_read("memory", n),
            )  # fmt: skip
        except grpc.RpcError as ex:
            return (), grpcutil.rpc_to_error(ex, "DownloadPages", self._coordinator), True
        except CpcoordError as ex:
            return (), ex, False
        except Exception as ex:
            if store is None:
                raise
            # Any failure of the agent's own read (a backend error outside the hierarchy
            # included) only sends it through the coordinator.
            return (), StoreError(f"reading {store.location}: {ex!r}"), False
        if store is None:
            self._on_read(path, sum(int(c.pages.size) for c in got) * PAGE_SIZE)
        return got, None, False

    def _fetcher(self, s: Session, job: str, gen: int, member: str) -> prefetch.Fetch:
        """A download for the ptrace thread (frozen: the pages written since the prefetch)."""

        def fetch(scope: prefetch.Scope | None) -> Contents:
            got, err, _ = self._download(s, job, gen, member, scope)
            if err is not None:
                raise err
            return got

        return fetch

    def _live_scopes(
        self, job: str, gen: int, members: tuple[str, ...], epoch: int
    ) -> tuple[tuple[str, PageNumbers], ...]:
        """A restore Freeze: the prefetched scopes large enough to back up live first
        (nodeagent/daemon/restore_live.py)."""
        out = []
        for name in members or self.prefetches.members(job, gen):
            pf = self.prefetches.peek(job, gen, name, epoch)
            if pf is None or pf.scope is None:
                continue
            pages = prefetch.absolute(pf.contents, pf.scope)
            if restore_live.wanted(pages):
                out.append((name, pages))
        return tuple(out)

    def _peek(self, job: str, member: str, base: int) -> PageNumbers | None:
        """The pages of the member that may differ from `base`, asked of the ptrace thread
        (the tracker is its own); None: unknown, every page is written."""
        done = threading.Event()
        box: list[PageNumbers | None] = [None]

        def reply(pages: PageNumbers | None) -> None:
            box[0] = pages
            done.set()

        self.worker.submit(ops.PeekOp(job, member, base, reply))
        return box[0] if done.wait(PEEK_TIMEOUT_S) else None

    def _prepare(self, s: Session, p: agent_pb2.Prepare) -> None:
        """Prefetch every member's pages to write, then Prepared (or Failed)."""
        names = []
        for pm in p.members:
            if s.closed.is_set():
                return
            dirty = self._peek(p.job, pm.member, pm.base_generation) if pm.base_generation else None
            scope = prefetch.scope_of(pm, dirty)
            contents, err, path = self._download(s, p.job, p.generation, pm.member, scope)
            if err is not None:
                fields = {"member": pm.member, "error": str(err)}
                log.warning("restore prefetch failed", extra={"fields": fields})
                self.prefetches.drop(p.job, p.generation)
                reason = ops.R.ABORT_REASON_RESTORE_FAILED
                self._emit(ops.failed(p.job, p.generation, pm.member, reason, err), s.epoch)
                return
            if s.closed.is_set():  # the stream ended meanwhile: nobody will Restore it
                self.prefetches.drop(p.job, p.generation)
                return
            size = sum(int(c.pages.size) for c in contents) * PAGE_SIZE
            base = pm.base_generation if scope is not None else 0
            self.prefetches.put(
                prefetch.Prefetched(
                    p.job, p.generation, pm.member, s.epoch, contents, scope, base, size, path
                )
            )
            names.append(pm.member)
        ready = agent_pb2.Prepared(job=p.job, generation=p.generation, members=names)
        self._emit(agent_pb2.AgentMessage(prepared=ready), s.epoch)

    def _restore(self, s: Session, job: str, gen: int, members: tuple[str, ...]) -> None:
        for member in members:
            if s.closed.is_set():
                return
            pf = self.prefetches.take(job, gen, member, s.epoch)
            if pf is not None:
                fetch = self._fetcher(s, job, gen, member) if pf.scope is not None else None
                op = ops.RestoreOp(
                    job, gen, member, pf.contents, None, s.epoch, pf.scope, pf.base, fetch,
                    pf.bytes, pf.read_path,
                )  # fmt: skip
                self.worker.submit(op)
                continue
            contents, err, path = self._download(s, job, gen, member)
            if err is not None:
                log.warning(
                    "restore download failed",
                    extra={"fields": {"member": member, "error": str(err)}},
                )
            op = ops.RestoreOp(job, gen, member, contents, err, s.epoch, read_path=path)
            self.worker.submit(op)

    def _read_cached(self, s: Session, command_id: int, rc: agent_pb2.ReadCached) -> None:
        """Send the coordinator chunks of this node's cache (nodeagent/daemon/cache_relay.py),
        then answer the command."""
        err: CpcoordError | None = None
        try:
            ids, data = relay.read(s.limits.direct, rc)
            s.bulk.SendCached(relay.messages(rc.token, ids, data), timeout=s.limits.timeout_s)
        except grpc.RpcError as ex:
            err = grpcutil.rpc_to_error(ex, "SendCached", self._coordinator)
        except CpcoordError as ex:
            err = ex
        except Exception as ex:  # a cache read outside the hierarchy: the read fails
            err = StoreError(f"reading the node cache: {ex!r}")
        if err is not None:
            log.warning("cached chunks not sent", extra={"fields": {"error": str(err)}})
        self._emit(ops.result(command_id, err=err), s.epoch)

    def _restore_into(self, s: Session, command_id: int, ri: agent_pb2.RestoreInto) -> None:
        contents, err, _ = self._download(s, ri.job, ri.generation, ri.member)
        target: ProcessIdentity | int = ri.target.pid
        if ri.target.start_time:
            target = ProcessIdentity(ri.target.pid, ri.target.start_time)
        now = tuple((r.name, r.start, r.end - r.start) for r in ri.regions)
        op = ops.RestoreIntoOp(command_id, ri.member, target, now, contents, err, s.epoch)
        self.worker.submit(op)
