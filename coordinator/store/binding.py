"""The catalog's binding to its store: a catalog describes exactly one store, the one it
was read from, and is never used against another.

A store has an id (`config/store.json`, written when the store is created; a store of an
older version without one gets one on its first open). The catalog records that id and
the store's endpoint (`Backend.source`: the resolved directory, or the S3 endpoint URL
with bucket and prefix) in its meta table. At every open (`bind`):
- same id, same endpoint: the catalog is the store's;
- another id (the bucket was recreated or emptied, another server answers at that name,
  a directory store was replaced), or another endpoint (a store copied or served
  elsewhere): the catalog belongs to another store. It is set aside
  (`catalog.sqlite.stale-<time>` beside it, for forensics), a new one is made, and the
  repository rebuilds it from the store's manifests (rebuild.py): the store stays the
  source of truth. Logged as a warning with both ids and endpoints;
- a catalog without a binding (made before bindings existed) is adopted when it can be
  this store's: the store already had its id and every committed generation the catalog
  lists has its manifest in the store; else it is set aside as above;
- a local store's catalog inside the store's own directory travels with it: a new path
  alone is recorded, not a reason to rebuild.
What a set-aside catalog knew and the store does not (aborted generations, pins,
registered members) is gone with it; members are attached again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator.store.catalog import Catalog, State
from cpcoord.log import log_event

log = logging.getLogger("cpcoord.store")
KEY_ID = "store_id"
KEY_ENDPOINT = "store_endpoint"


@dataclass(frozen=True)
class StoreRef:
    id: str
    endpoint: str


@dataclass(frozen=True)
class Rebound:
    """A catalog found to belong to another store, set aside and replaced."""

    why: str
    old: StoreRef | None
    new: StoreRef
    set_aside: Path


def bound_to(catalog: Catalog) -> StoreRef | None:
    sid, ep = catalog.meta(KEY_ID), catalog.meta(KEY_ENDPOINT)
    return StoreRef(sid, ep or "") if sid else None


def mismatch(
    catalog: Catalog,
    now: StoreRef,
    *,
    store_new: bool,
    manifests: Callable[[], set[str]],
    travels: bool,
) -> str:
    """Why `catalog` is not the catalog of the store `now` (empty: it is). `store_new`:
    the store had no id before this open; `manifests()`: the names the store holds;
    `travels`: the catalog lives inside the store (a local store's directory)."""
    old = bound_to(catalog)
    if old is not None:
        if old.id != now.id:
            return f"it belongs to store {old.id}, this store is {now.id}"
        if old.endpoint != now.endpoint and not travels:
            return f"it was read from {old.endpoint}, the store is read from {now.endpoint}"
        return ""
    if catalog.empty():
        return ""
    if store_new:
        return "it lists jobs, and the store is new (it had no id)"
    committed = {g.manifest for g in catalog.generations(state=State.COMMITTED) if g.manifest}
    lost = committed - manifests()
    if lost:
        first = sorted(lost)[0]
        return f"{len(lost)} committed generation(s) it lists are not in the store ({first})"
    return ""


def record(catalog: Catalog, now: StoreRef) -> None:
    old = bound_to(catalog)
    if old == now:
        return
    if old is not None and old.endpoint != now.endpoint:
        log_event(log, logging.INFO, "store moved with its catalog", was=old.endpoint,
                  now=now.endpoint, store=now.id)  # fmt: skip
    catalog.set_meta({KEY_ID: now.id, KEY_ENDPOINT: now.endpoint})


def set_aside(catalog: Catalog) -> Path:
    """Close the catalog and move its file out of the way (the caller opens a new one)."""
    catalog.close()
    path = catalog.path
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.with_name(f"{path.name}.stale-{stamp}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.stale-{stamp}-{n}")
        n += 1
    path.rename(dest)
    for extra in ("-wal", "-shm"):  # closing checkpoints the WAL; leftovers are stale
        path.with_name(path.name + extra).unlink(missing_ok=True)
    return dest


def bind(
    catalog: Catalog,
    now: StoreRef,
    *,
    store_new: bool,
    manifests: Callable[[], set[str]],
    travels: bool,
) -> tuple[Catalog, Rebound | None]:
    """The catalog to use with the store `now`: this one, bound to it, or (see the module
    docstring) a new empty one after setting this one aside. The caller rebuilds a new
    one from the store's manifests."""
    old = bound_to(catalog)
    why = mismatch(catalog, now, store_new=store_new, manifests=manifests, travels=travels)
    if not why:
        record(catalog, now)
        return catalog, None
    aside = set_aside(catalog)
    fresh = Catalog(catalog.path)
    record(fresh, now)
    log_event(
        log, logging.WARNING, "catalog belongs to another store: set aside, rebuilding from "
        "the store", why=why, catalog_store=old.id if old else "", catalog_endpoint=
        old.endpoint if old else "", store=now.id, endpoint=now.endpoint, set_aside=str(aside),
    )  # fmt: skip
    return fresh, Rebound(why, old, now, aside)
