"""Tracker backends by name: how to make one, whether it works here, the automatic choice.

Owns the names the wire uses (`uffd-wp`, `soft-dirty`, `hash`, `none`; `full` is read as
`none`), the factories, and the order `auto` tries them in: uffd-wp (the kernel records
writes and re-arms in one ioctl), soft-dirty (the kernel records writes, pagemap read),
hash (reads every page while frozen, saves upload only). `none` is no tracker: every
capture is full.

Backends are looked up by module, so one that is not built (an older tree without
`nodeagent/trackers/hashtrk.py`) is reported unavailable instead of breaking the agent.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from cpcoord.errors import InvalidArgument, TrackerUnavailable
from nodeagent.trackers.base import Availability, Tracker

NONE = "none"
AUTO = "auto"
# The order `auto` tries, best first; also the order Hello lists them in.
AUTO_ORDER = ("uffd-wp", "soft-dirty", "hash")
ALIASES = {"full": NONE, "": AUTO}


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # nodeagent.trackers.<module>
    cls: str  # the Tracker class in it
    availability: str  # module-level function, "" = always available once imported


_BACKENDS = {
    "uffd-wp": Backend(
        "uffd-wp", "uffdwp", "UffdWpTracker", "nodeagent.trackers.uffd_avail:availability"
    ),
    "soft-dirty": Backend("soft-dirty", "softdirty", "SoftDirtyTracker", "availability"),
    "hash": Backend("hash", "hashtrk", "HashTracker", ""),
}


def canonical(name: str) -> str:
    """The registry's name for `name` (aliases resolved); InvalidArgument if unknown."""
    n = ALIASES.get(name.strip(), name.strip())
    if n not in (AUTO, NONE) and n not in _BACKENDS:
        known = ", ".join((AUTO, *AUTO_ORDER, NONE))
        raise InvalidArgument(f"unknown tracker {name!r} (known: {known})")
    return n


def _factory(b: Backend) -> Callable[[], Tracker]:
    mod = importlib.import_module(f"nodeagent.trackers.{b.module}")
    cls: Callable[[], Tracker] = getattr(mod, b.cls)
    return cls


@cache
def availability(name: str) -> Availability:
    """Whether backend `name` works on this kernel (cached: the kernel will not change)."""
    n = canonical(name)
    if n == NONE:
        return Availability(NONE, True, "always: every present page, every time")
    if n == AUTO:
        best = choose(AUTO)
        return Availability(AUTO, True, f"picks {best}")
    b = _BACKENDS[n]
    try:
        _factory(b)
        if not b.availability:
            return Availability(n, True, "always: compares a digest of every present page")
        modname, _, fn = b.availability.rpartition(":")
        mod = importlib.import_module(modname or f"nodeagent.trackers.{b.module}")
        avail: Availability = getattr(mod, fn)()
    except (ImportError, AttributeError) as e:
        return Availability(n, False, f"not built into this agent: {e}")
    except Exception as e:  # a probe reports, it never takes the agent down
        return Availability(n, False, f"probe failed: {type(e).__name__}: {e}")
    return Availability(n, avail.available, avail.reason)


def report() -> list[Availability]:
    """Every backend, available or not, best first (for Hello.trackers)."""
    return [availability(n) for n in (*AUTO_ORDER, NONE)]


def choose(name: str, exclude: frozenset[str] = frozenset()) -> str:
    """The backend to use for a preference: `auto` -> the best available one not in
    `exclude` (`none` if none is); a named one -> itself if available, else
    TrackerUnavailable."""
    n = canonical(name)
    if n == AUTO:
        for cand in AUTO_ORDER:
            if cand not in exclude and availability(cand).available:
                return cand
        return NONE
    avail = availability(n)
    if not avail.available:
        raise TrackerUnavailable(n, avail.reason)
    return n


def create(name: str) -> Tracker | None:
    """A fresh tracker instance for a backend name; None for `none`."""
    n = canonical(name)
    if n == NONE:
        return None
    if n == AUTO:
        return create(choose(AUTO))
    return _factory(_BACKENDS[n])()
