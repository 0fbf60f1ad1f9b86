"""Where the coordinator is when it runs as replicas: an address list and the leader.

`--coordinator` (and $CPCOORD_COORDINATOR, `cpcoord.api.Client(address=...)`, the
agent's `--coordinator`) accepts `HOST:PORT[,HOST:PORT...]`. `Endpoints` holds the list
and which address to try next: the leader a follower named in its `NotLeader` answer,
else the next address in turn. `Failover` is the retry policy of one call: follow
NotLeader, move on from an unreachable address, and once every address failed in a
round, wait a little (an election takes a few seconds) until the budget is spent.

Only refusals that say "not here" are retried: NotLeader, and an address that cannot
be reached. Anything the leader answered is final. A single address that cannot be
reached fails at once (as before replicas existed), unless a follower named it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cpcoord.errors import (
    CoordinatorStopping,
    CoordinatorUnavailable,
    CpcoordError,
    InvalidArgument,
    NoCoordinatorAddress,
    NotLeader,
)

FAILOVER_S = 20.0  # how long one call may look for a leader (an election takes ~TTL)
ROUND_PAUSE_S = (0.1, 1.0)  # wait after a round of failures: doubling, capped


def parse(text: str) -> tuple[str, ...]:
    """`HOST:PORT[,HOST:PORT...]` -> the addresses, in order, without repeats."""
    out: list[str] = []
    for raw in (text or "").split(","):
        a = raw.strip()
        if not a:
            continue
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InvalidArgument(f"coordinator address {a!r}: expected HOST:PORT")
        if a not in out:
            out.append(a)
    if not out:
        raise NoCoordinatorAddress()
    return tuple(out)


class Endpoints:
    def __init__(self, addresses: str | tuple[str, ...]) -> None:
        self.addresses = list(parse(addresses) if isinstance(addresses, str) else addresses)
        self._lock = threading.Lock()
        self._i = 0

    def __str__(self) -> str:
        return ",".join(self.addresses)

    @property
    def current(self) -> str:
        with self._lock:
            return self.addresses[self._i]

    def follow(self, leader: str) -> bool:
        """Try `leader` next (added to the list if new); False if it is already current."""
        with self._lock:
            if leader not in self.addresses:
                self.addresses.append(leader)
            i = self.addresses.index(leader)
            moved, self._i = i != self._i, i
            return moved

    def advance(self) -> str:
        with self._lock:
            self._i = (self._i + 1) % len(self.addresses)
            return self.addresses[self._i]


class Failover:
    """The retry state of one call over `Endpoints`."""

    def __init__(
        self,
        eps: Endpoints,
        budget_s: float = FAILOVER_S,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.eps = eps
        self.deadline = clock() + budget_s
        self.sleep = sleep
        self.clock = clock
        self.misses = 0  # addresses failed since the last pause
        self.pause = ROUND_PAUSE_S[0]
        self.followed = False

    def retry(self, err: CpcoordError) -> bool:
        """After `err` from the current address: whether to try again (and where is
        now `eps.current`); False means raise it."""
        if isinstance(err, NotLeader):
            leader = err.leader
            if leader and self.eps.follow(leader):
                self.followed = True
                return self.clock() < self.deadline
            self.eps.advance()
        elif isinstance(err, CoordinatorUnavailable | CoordinatorStopping):
            if len(self.eps.addresses) == 1 and not self.followed:
                return False
            self.eps.advance()
        else:
            return False
        self.misses += 1
        if self.misses >= len(self.eps.addresses):  # a whole round: an election runs
            self.misses = 0
            if self.clock() + self.pause >= self.deadline:
                return False
            self.sleep(self.pause)
            self.pause = min(ROUND_PAUSE_S[1], self.pause * 2)
        return self.clock() < self.deadline
