"""A coordinator replica: serves always, leads when elected (`cpcoord coordinator --etcd`).

Every replica listens on its own address from the start. A follower has no engine and
no store open: each call is answered `NotLeader` with the leader's address
(coordinator/serving.py), and its health is NOT_SERVING for the cpcoord services. When
the elector (election.py) reports this replica elected, `Replica` takes the store over
on a thread of its own while the lease is kept alive:
1. open the store, waiting for the flock as long as the term lasts (a deposed leader
   releases it when it has stopped; one that is still closing is waited for);
2. reopening aborts the generation the old leader had in flight (PREPARING -> ABORTED;
   its agents thawed when their streams broke), then `rebuild_catalog` adds any
   complete manifest the catalog lacks (a catalog restored from a backup, an S3 store's
   local catalog behind the bucket): the store's manifests are the source of truth;
3. install the fence (election.py) on the store's commit, start an engine, serve it.
Agents and clients find the new leader through NotLeader and their address lists.

Deposed (lease lapsed, etcd unreachable past the margin, SIGTERM): stop serving at once
(NotLeader from then on), close the engine (what is in flight aborts, every agent
stream ends, so agents redial and find the new leader), close the store (the flock is
released). Metrics: coordinator/ha/metrics.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.engine import Engine, Options
from coordinator.ha.election import Elector, Term
from coordinator.serving import Serving
from coordinator.store import Repository
from coordinator.store.config import StoreConfig
from coordinator.store.location import open_repository
from coordinator.store.rebuild import rebuild_catalog
from cpcoord.errors import CpcoordError, StoreLocked
from cpcoord.log import log_event
from storecore.crypt import Sealer

log = logging.getLogger("cpcoord.coordinator.ha")
LOCK_RETRY_S = 0.1


class Replica:
    def __init__(
        self,
        store: Path | str,
        options: Options,
        serving: Serving,
        sealer: Sealer | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.store = store
        self.options = options
        self.serving = serving
        self.sealer = sealer
        self.state_dir = state_dir
        self.elector: Elector | None = None  # set by the caller before it starts
        self._lock = threading.Lock()
        self._engine: Engine | None = None
        self._repo: Repository | None = None
        self._term: Term | None = None
        self._stopping = False
        self.failovers = 0  # terms this replica took over (its first included)
        self.lost: dict[str, int] = {}  # leadership lost, by reason
        # Called with each new engine (metrics hooks), before it serves.
        self.on_engine: list[Callable[[Engine], None]] = []

    # -- what metrics read ------------------------------------------------------------

    @property
    def engine(self) -> Engine | None:
        with self._lock:
            return self._engine

    @property
    def term(self) -> int:
        with self._lock:
            return self._term.number if self._term is not None else 0

    # -- elector callbacks ----------------------------------------------------------------

    def leader_seen(self, address: str) -> None:
        self.serving.set_leader(address)

    def elected(self, term: Term) -> None:
        threading.Thread(
            target=self._take_over, args=(term,), name="ha-takeover", daemon=True
        ).start()

    def deposed(self, kind: str, detail: str) -> None:
        with self._lock:
            self.lost[kind] = self.lost.get(kind, 0) + 1
        self._step_down(f"{kind}: {detail}")

    # -- takeover and step-down ---------------------------------------------------------

    def _holds(self, term: Term) -> bool:
        return self.elector is not None and self.elector.holds(term) and not self._stopping

    def _take_over(self, term: Term) -> None:
        t0 = time.monotonic()
        repo = None
        while self._holds(term):
            try:
                repo, _ = open_repository(
                    self.store, state_dir=self.state_dir, config=StoreConfig(sealer=self.sealer)
                )
                break
            except StoreLocked:  # the deposed leader is still closing it
                time.sleep(LOCK_RETRY_S)
            except CpcoordError as e:
                log_event(log, logging.ERROR, "cannot open the store", why=str(e))
                time.sleep(1.0)
        if repo is None:
            return
        engine = None
        try:
            report = rebuild_catalog(repo)
            elector = self.elector
            assert elector is not None
            repo.fence = lambda step: elector.fence(term, ask_etcd=step == "manifest")
            engine = Engine(repo, self.options)
            for hook in self.on_engine:
                hook(engine)
            engine.start()
            with self._lock:
                if not self._holds(term):
                    raise _Abandoned()
                self._engine, self._repo, self._term = engine, repo, term
                self.failovers += 1
                # Under the lock: a step-down that comes now waits, then clears it.
                self.serving.set_engine(engine, leader=term.address)
        except BaseException as e:
            if engine is not None:
                engine.close()
            repo.close()
            if not isinstance(e, _Abandoned):
                log.exception("takeover failed")
                if self.elector is not None:
                    self.elector.resign(f"takeover failed: {type(e).__name__}")
            return
        took = round(time.monotonic() - t0, 3)
        log_event(
            log, logging.INFO, "leading", term=term.number, takeover_s=took,
            restored=len(report.restored), store=str(self.store),
        )  # fmt: skip

    def _step_down(self, reason: str) -> None:
        with self._lock:
            self.serving.set_engine(None, leader="")  # refuse new calls first
            engine, repo, term = self._engine, self._repo, self._term
            self._engine = self._repo = self._term = None
        if engine is None or repo is None:
            return
        log_event(log, logging.WARNING, "stepping down", term=term.number if term else 0,
                  why=reason)  # fmt: skip
        engine.close()  # in flight: aborted; agents' streams end, they redial
        repo.close()  # releases the flock: the next leader may open the store
        log_event(log, logging.INFO, "stepped down", term=term.number if term else 0)

    def stop(self) -> None:
        """SIGTERM: stop leading (and campaigning), close everything."""
        self._stopping = True
        self._step_down("the coordinator is stopping")


class _Abandoned(Exception):
    """The term ended while the store was being taken over."""
