"""Leader election of coordinator replicas on etcd, and the fence every commit passes.

One key, `PREFIX/leader`, held by the leader and bound to its etcd lease (TTL `ttl_s`,
a few seconds). A replica campaigns when the key is absent: it grants a lease and puts
the key only if it does not exist (one txn). The winner's *term* is the key's create
revision: etcd revisions only grow, so a later leader always has a larger term.

The leader renews its lease every `ttl_s / 4`. Safety does not depend on clocks agreeing,
only on their rates: etcd counts a renewed lease from when it *received* the keepalive,
which is after the leader *sent* it, so the lease lasts at least until `sent + TTL` of
the last keepalive that succeeded. The leader holds itself valid only until `sent + TTL
- margin` (`LeaseClock`); past that it steps down, so a partitioned leader stops before
its lease can expire and before any other replica can be elected. Every commit calls
`fence()` before the manifest is written and before the catalog flip: the local deadline
must not have passed, and before the manifest an etcd txn must confirm the key still has
this term's create revision and lease (a linearizable check, not a cached belief).

`Elector` runs this on a thread of its own and reports to its owner: `elected(term)`
(take over the store; runs on another thread, the lease is kept alive meanwhile),
`deposed(reason)` (step down), `leader_seen(address)` (whom followers name).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from coordinator.ha.etcd import EtcdClient
from cpcoord.errors import CpcoordError, EtcdUnavailable, InvalidArgument, LeadershipLost
from cpcoord.log import log_event

log = logging.getLogger("cpcoord.coordinator.ha")


@dataclass(frozen=True)
class Timing:
    ttl_s: int = 3  # the lease's TTL: a dead leader is replaced after about this long

    def __post_init__(self) -> None:
        if not 2 <= self.ttl_s <= 60:
            raise InvalidArgument(f"the leader lease TTL must be 2..60 s, got {self.ttl_s}")

    @property
    def keepalive_s(self) -> float:
        return self.ttl_s / 4

    @property
    def margin_s(self) -> float:
        """How long before the lease can expire the leader stops (clock rates, the time
        a commit takes from its last check to its catalog flip)."""
        return max(0.5, self.ttl_s / 3)

    @property
    def poll_s(self) -> float:
        """How often followers look at the leader key."""
        return min(0.25, self.ttl_s / 8)


class LeaseClock:
    """Until when this replica may act as leader, from its own monotonic clock."""

    def __init__(self, margin_s: float) -> None:
        self.margin_s = margin_s
        self.valid_until = float("-inf")

    def renewed(self, sent_at: float, ttl_s: float) -> None:
        """A keepalive (or grant) sent at `sent_at` got `ttl_s` seconds."""
        self.valid_until = max(self.valid_until, sent_at + ttl_s - self.margin_s)

    def valid(self, now: float) -> bool:
        return now < self.valid_until

    def remaining(self, now: float) -> float:
        return self.valid_until - now


@dataclass(frozen=True)
class Term:
    number: int  # the leader key's create revision
    lease: int
    address: str  # this replica's advertised HOST:PORT


class Owner(Protocol):
    def elected(self, term: Term) -> None: ...
    def deposed(self, kind: str, detail: str) -> None: ...
    def leader_seen(self, address: str) -> None: ...


# Why a term ended (the `reason` label of cpcoord_coordinator_leadership_lost_total).
LAPSED = "lease_lapsed"  # no keepalive succeeded within TTL - margin (etcd unreachable)
EXPIRED = "lease_expired"  # etcd says the lease is gone
RESIGNED = "resigned"  # this replica gave it up (stopping, or could not take over)
FAILED = "elector_failed"  # a bug in the loop


def identity(address: str) -> bytes:
    """The leader key's value: who leads and where to reach it (JSON)."""
    me = {"address": address, "host": socket.gethostname(), "pid": os.getpid()}
    return json.dumps(me, sort_keys=True).encode()


def address_of(value: bytes) -> str:
    try:
        return str(json.loads(value).get("address", ""))
    except (ValueError, AttributeError):
        return ""


class Elector:
    def __init__(
        self,
        client: EtcdClient,
        prefix: str,
        address: str,
        owner: Owner,
        timing: Timing | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.key = (prefix.rstrip("/") + "/leader").encode()
        self.address = address
        self.owner = owner
        self.timing = timing or Timing()
        self.clock = clock
        self._lock = threading.Lock()
        self._term: Term | None = None
        self._lease_clock = LeaseClock(self.timing.margin_s)
        self._stop = threading.Event()
        self._quiet_until = float("-inf")  # no campaign before (after a resignation)
        self._thread = threading.Thread(target=self._run, name="ha-elector", daemon=True)

    # -- queries ----------------------------------------------------------------------

    @property
    def term(self) -> Term | None:
        with self._lock:
            return self._term

    def holds(self, term: Term | None = None) -> bool:
        """Whether this replica leads (in `term`, when given) and its lease is valid."""
        with self._lock:
            cur = self._term
            ok = cur is not None and self._lease_clock.valid(self.clock())
        return ok and (term is None or cur == term)

    def fence(self, term: Term, ask_etcd: bool) -> None:
        """Raise LeadershipLost unless this replica still leads in `term`: the local
        deadline, and with `ask_etcd` a txn on the leader key (bounded by the time the
        lease has left)."""
        try:
            self._fence(term, ask_etcd)
        except LeadershipLost as e:
            log_event(log, logging.WARNING, "commit refused", term=term.number, why=str(e))
            raise

    def _fence(self, term: Term, ask_etcd: bool) -> None:
        with self._lock:
            left = self._lease_clock.remaining(self.clock())
            cur = self._term
        if cur != term or left <= 0:
            raise LeadershipLost(f"term {term.number} ended or its lease is about to expire")
        if not ask_etcd:
            return
        try:
            held = self.client.txn_holds(self.key, term.number, term.lease, timeout_s=left)
        except EtcdUnavailable as e:
            raise LeadershipLost(f"etcd did not confirm term {term.number}: {e}") from None
        if not held:
            raise LeadershipLost(f"the leader key no longer belongs to term {term.number}")
        if not self.holds(term):
            raise LeadershipLost(f"term {term.number}: the lease lapsed during the check")

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def resign(self, detail: str) -> None:
        """Give up the current term (this replica cannot lead: e.g. the store would not
        open) and stay out of the next election for a TTL, so another replica wins it."""
        with self._lock:
            self._quiet_until = self.clock() + self.timing.ttl_s
        self._lose(RESIGNED, detail)

    def stop(self, resign: bool = True) -> None:
        """Stop campaigning; when leading and `resign`, give the lease back at once so
        another replica need not wait for it to expire."""
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            term, self._term = self._term, None
        if term is not None and resign:
            try:
                self.client.revoke(term.lease, timeout_s=1.0)
            except CpcoordError as e:
                log_event(log, logging.WARNING, "could not resign", why=str(e))

    # -- the loop ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.term is None:
                    self._follow()
                else:
                    self._lead()
            except Exception as e:  # never let the elector die: that would freeze a term
                log.exception("elector step failed")
                self._lose(FAILED, type(e).__name__)
                self._stop.wait(self.timing.poll_s)

    def _follow(self) -> None:
        t = self.timing
        try:
            kv = self.client.get(self.key, timeout_s=t.ttl_s / 2)
        except EtcdUnavailable as e:
            log_event(log, logging.WARNING, "etcd unavailable", why=str(e))
            self.owner.leader_seen("")
            self._stop.wait(t.poll_s * 4)
            return
        if kv is not None or self.clock() < self._quiet_until:
            self.owner.leader_seen(address_of(kv.value) if kv is not None else "")
            self._stop.wait(t.poll_s)
            return
        self._campaign()

    def _campaign(self) -> None:
        t = self.timing
        sent = self.clock()
        try:
            lease, ttl = self.client.grant(t.ttl_s, timeout_s=t.ttl_s / 2)
        except EtcdUnavailable as e:
            log_event(log, logging.WARNING, "etcd unavailable", why=str(e))
            self._stop.wait(t.poll_s * 4)
            return
        try:
            won, kv = self.client.txn_create(
                self.key, identity(self.address), lease, timeout_s=t.ttl_s / 2
            )
        except EtcdUnavailable as e:
            log_event(log, logging.WARNING, "campaign failed", why=str(e))
            self._revoke_quietly(lease)
            return
        if not won:
            self._revoke_quietly(lease)
            if kv is not None:
                self.owner.leader_seen(address_of(kv.value))
            self._stop.wait(t.poll_s)
            return
        assert kv is not None
        term = Term(kv.create_revision, lease, self.address)
        with self._lock:
            self._lease_clock = LeaseClock(t.margin_s)
            self._lease_clock.renewed(sent, ttl)
            self._term = term
        log_event(log, logging.INFO, "elected", term=term.number, address=self.address)
        self.owner.leader_seen(self.address)
        self.owner.elected(term)

    def _revoke_quietly(self, lease: int) -> None:
        with contextlib.suppress(CpcoordError):  # else it expires by itself
            self.client.revoke(lease, timeout_s=self.timing.ttl_s / 2)

    def _lead(self) -> None:
        t = self.timing
        term = self.term
        assert term is not None
        with self._lock:
            left = self._lease_clock.remaining(self.clock())
        if left <= 0:
            self._lose(LAPSED, f"no keepalive succeeded for {t.ttl_s - t.margin_s:.1f} s")
            return
        sent = self.clock()
        try:
            ttl = self.client.keepalive(term.lease, timeout_s=min(left, t.keepalive_s))
        except EtcdUnavailable as e:
            log_event(log, logging.WARNING, "keepalive failed", term=term.number, why=str(e))
            ttl = -1
        if ttl == 0:
            self._lose(EXPIRED, "etcd says the lease is gone")
            return
        if ttl > 0:
            with self._lock:
                self._lease_clock.renewed(sent, ttl)
        # Sleep until the next keepalive, but wake to step down the moment validity ends.
        with self._lock:
            left = self._lease_clock.remaining(self.clock())
        self._stop.wait(max(0.0, min(t.keepalive_s - (self.clock() - sent), left)))

    def _lose(self, kind: str, detail: str) -> None:
        with self._lock:
            term, self._term = self._term, None
        if term is None:
            return
        log_event(log, logging.WARNING, "leadership lost", term=term.number, reason=kind,
                  why=detail)  # fmt: skip
        self.owner.leader_seen("")
        self.owner.deposed(kind, detail)
        self._revoke_quietly(term.lease)  # if etcd still hears us, free the key now
