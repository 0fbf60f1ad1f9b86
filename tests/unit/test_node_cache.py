"""The node cache's bookkeeping (nodeagent/cache/store.py): space, retention, sweep, and
the drain's token bucket. Real files in a tmp directory; no daemons."""

from __future__ import annotations

from pathlib import Path

from nodeagent.cache.drain import Bucket
from nodeagent.cache.store import NodeCache, TieredBackend
from storecore.backend import Kind, LocalBackend


def _put(cache: NodeCache, store: LocalBackend, job: str, gen: int, name: str, n: int) -> None:
    TieredBackend(cache, store, job, gen).put_parts(Kind.PACKS, name, [b"x" * n])


def test_packs_go_to_the_cache_until_full_then_to_the_store(tmp_path: Path) -> None:
    store = LocalBackend(tmp_path / "store")
    cache = NodeCache(tmp_path / "cache", size=10_000, keep=1)
    _put(cache, store, "j", 1, "nodes/n/a1", 6000)
    _put(cache, store, "j", 1, "nodes/n/a2", 6000)  # does not fit: nothing drained to evict
    assert cache.cached("j", 1) == ["nodes/n/a1"] and cache.full == 1
    assert store.exists(Kind.PACKS, "nodes/n/a2") and not store.exists(Kind.PACKS, "nodes/n/a1")
    assert cache.committed("j", 1) == ["nodes/n/a1"]
    # Undrained: never evicted, so generation 2 goes to the store too.
    _put(cache, store, "j", 2, "nodes/n/b1", 6000)
    assert cache.cached("j", 2) == [] and cache.full == 2
    # Drained: evicted when space is needed.
    cache.drained("j", 1, ["nodes/n/a1"])
    _put(cache, store, "j", 3, "nodes/n/c1", 6000)
    assert cache.cached("j", 3) == ["nodes/n/c1"] and not cache.has("nodes/n/a1")
    assert cache.bytes == 6000


def test_keeps_the_newest_drained_generations_per_job_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    store = LocalBackend(tmp_path / "store")
    cache = NodeCache(tmp_path / "cache", keep=2)
    for g in (1, 2, 3):
        _put(cache, store, "j", g, f"nodes/n/p{g}", 100)
        cache.committed("j", g)
    cache.drained("j", 1, ["nodes/n/p1"])
    cache.drained("j", 3, ["nodes/n/p3"])  # 1 is beyond the newest 2 and drained: evicted
    assert not cache.has("nodes/n/p1") and cache.has("nodes/n/p2") and cache.has("nodes/n/p3")
    again = NodeCache(tmp_path / "cache", keep=2)  # the ledger and the packs are on disk
    assert again.has("nodes/n/p2") and again.bytes == 200
    # A sweep at the next Welcome keeps listed and owed packs, drops the rest.
    _put(again, store, "j", 4, "nodes/n/p4", 100)  # in flight when the stream broke
    assert again.sweep(owed=set()) == 1 and not again.has("nodes/n/p4")
    assert again.has("nodes/n/p2") and again.has("nodes/n/p3")


def test_aborted_generation_packs_are_removed(tmp_path: Path) -> None:
    store = LocalBackend(tmp_path / "store")
    cache = NodeCache(tmp_path / "cache")
    _put(cache, store, "j", 1, "nodes/n/x", 100)
    cache.aborted("j", 1)
    assert not cache.has("nodes/n/x") and cache.bytes == 0
    assert not (tmp_path / "cache" / "packs" / "nodes" / "n" / "x").exists()


def test_bucket_paces_to_the_rate_with_one_second_of_burst() -> None:
    now = [0.0]
    b = Bucket(1000.0, clock=lambda: now[0])
    assert b.delay(1000) == 0.0  # the burst
    assert b.delay(500) == 0.5
    now[0] = 2.0  # refilled (capped at one second's worth)
    assert b.delay(1000) == 0.0
    assert Bucket(0).delay(10**9) == 0.0  # unlimited
