"""A catalog belongs to one store (coordinator/store/binding.py).

A real coordinator and agent checkpoint a member into a store; the coordinator stops;
the store is replaced by a new, empty one under the same name: a fresh SeaweedFS with
the same bucket (its data wiped, the same endpoint), or an empty directory at the same
path (the catalog kept apart with --state-dir). The coordinator restarts on the same
catalog path. It must see that its catalog describes another store, set it aside and
rebuild from the store: `generations` lists nothing stale, `attach` of the member works
again, and a new checkpoint commits and exports exactly. (Before, the old catalog was
opened as is: it listed a committed generation whose manifest did not exist, export
failed with `store object manifests/JOB/0000000001 not found`, and attach was refused.)

In process, the same for the Repository itself (a directory store with its catalog
apart, an S3 store), and the binding's decisions one by one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from coordinator.store import Repository, StoreConfig
from coordinator.store.binding import KEY_ENDPOINT, KEY_ID
from coordinator.store.config import CONFIG_NAME
from storecore.backend import Kind, LocalBackend
from testbed.cluster import Cluster
from testbed.daemons import wait_for
from testbed.driver import Target
from testbed.seaweed import BUCKET, Seaweed
from tests.helpers.e2e import attach, export, exported
from tests.helpers.store_support import checkpoint, rand

pytestmark = pytest.mark.integration
CONFIG = StoreConfig(pack_size=1 << 18)


def _attach_when_ready(c: Cluster, t: Target) -> None:
    """Attach, retrying while the restarted coordinator still reconciles the agent."""

    def ok() -> bool:
        try:
            attach(c, "job", "m", t, "node-a")
        except AssertionError as e:
            if "AgentUnavailable" in str(e) or "not ready" in str(e) or "unavailable" in str(e):
                return False
            raise
        return True

    wait_for(ok, 30, "the member attached")


def _checkpoint_exports_exactly(c: Cluster, t: Target, out: Path) -> int:
    r = c.cli_json("checkpoint", "--job", "job")
    assert r["state"] == "committed", r
    n = int(r["generation"])
    export(c, "job", n, out)
    data, offsets = exported(out, "m")
    mem = t.read("data")
    assert np.array_equal(data[offsets.astype(np.int64)], mem[offsets.astype(np.int64)])
    assert offsets.size == mem.shape[0]
    return n


def _replaced_store_is_noticed(c: Cluster, t: Target, replace: Callable[[], None]) -> None:
    attach(c, "job", "m", t, "node-a")
    _checkpoint_exports_exactly(c, t, c.root / "before")
    assert c.cli_json("generations", "--job", "job")["generations"]
    assert c.coordinator is not None
    c.coordinator.stop()
    replace()
    t.cmd("write", name="data", page=0, count=8, counter=3)  # memory moves on meanwhile
    c.start_coordinator()
    c.wait_agents(["node-a"])
    gens = c.cli_json("generations", "--job", "job", check=False)
    assert not (gens or {}).get("generations"), f"stale generations listed: {gens}"
    _attach_when_ready(c, t)
    n = _checkpoint_exports_exactly(c, t, c.root / "after")
    listed = c.cli_json("generations", "--job", "job")["generations"]
    assert [g["generation"] for g in listed] == [n]
    log = (c.root / "coordinator.log").read_text()
    assert "catalog belongs to another store" in log, log[-3000:]


@pytest.mark.slow
def test_a_fresh_bucket_of_the_same_name_gets_a_new_catalog(
    cluster_factory: Callable[..., Cluster],
    target_factory: Callable[..., Target],
    seaweed_private: Seaweed,
    tmp_path: Path,
) -> None:
    sw = seaweed_private
    env = {**sw.env(), "CPCOORD_STATE_DIR": str(tmp_path / "state")}
    c = cluster_factory(nodes=("node-a",), store_url=f"s3://{BUCKET}", extra_env=env)
    t = target_factory(maps=["data:64:anon:random:5"])

    def new_server() -> None:  # a fresh, empty SeaweedFS at the same endpoint
        sw.kill()
        shutil.rmtree(sw.root / "data")
        (sw.root / "data").mkdir()
        sw.start()

    _replaced_store_is_noticed(c, t, new_server)


@pytest.mark.slow
def test_an_empty_directory_in_place_of_the_store_gets_a_new_catalog(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    store = tmp_path / "dirstore"
    c = cluster_factory(nodes=("node-a",), store_url=str(store), state_dir=tmp_path / "cat")
    t = target_factory(maps=["data:64:anon:random:6"])

    def new_dir() -> None:
        shutil.rmtree(store)
        store.mkdir()

    _replaced_store_is_noticed(c, t, new_dir)


# -- the Repository in process -----------------------------------------------------------


def test_repository_rebuilds_a_catalog_of_a_replaced_directory(tmp_path: Path) -> None:
    store, state = tmp_path / "store", tmp_path / "state"
    with Repository(LocalBackend(store), state, CONFIG) as repo:
        checkpoint(repo, "j", {"m": {"r": rand(8, 1)}})
        old_id = repo.identity["id"]
    shutil.rmtree(store)
    with Repository(LocalBackend(store), state, CONFIG) as repo:
        assert repo.generations() == [], "a generation of the old store is listed"
        assert repo.rebound is not None and repo.rebound.old is not None
        assert repo.rebound.old.id == old_id != repo.identity["id"]
        assert repo.rebound.set_aside.exists()
        assert checkpoint(repo, "j", {"m": {"r": rand(8, 2)}}) >= 1
    with Repository(LocalBackend(store), state, CONFIG) as repo:  # bound now: kept
        assert repo.rebound is None and len(repo.generations()) == 1


def test_repository_keeps_what_the_store_still_holds(tmp_path: Path) -> None:
    """A store served from elsewhere (same id, another endpoint): rebuilt from the store,
    so what it holds is listed again; a local store's own catalog moves with it."""
    store, state = tmp_path / "store", tmp_path / "state"
    with Repository(LocalBackend(store), state, CONFIG) as repo:
        g = checkpoint(repo, "j", {"m": {"r": rand(8, 1)}})
    moved = tmp_path / "moved"
    store.rename(moved)
    with Repository(LocalBackend(moved), state, CONFIG) as repo:
        assert repo.rebound is not None and "read from" in repo.rebound.why
        assert [x.number for x in repo.generations("j")] == [g]
        assert repo.rebuilt is not None and repo.rebuilt.restored == (("j", g),)
    inside = tmp_path / "inside"
    with Repository.open_local(inside, CONFIG) as repo:
        checkpoint(repo, "j", {"m": {"r": rand(8, 1)}})
    inside.rename(tmp_path / "inside2")
    with Repository.open_local(tmp_path / "inside2", CONFIG) as repo:
        assert repo.rebound is None and len(repo.generations()) == 1
        assert repo.catalog.meta(KEY_ENDPOINT) == "file://" + str(tmp_path / "inside2")


def test_an_unbound_catalog_is_adopted_only_when_it_fits(tmp_path: Path) -> None:
    store, state = tmp_path / "store", tmp_path / "state"
    with Repository(LocalBackend(store), state, CONFIG) as repo:
        checkpoint(repo, "j", {"m": {"r": rand(8, 1)}})
        sid = repo.identity["id"]
    _unbind(state)
    with Repository(LocalBackend(store), state, CONFIG) as repo:  # an older version's
        assert repo.rebound is None and len(repo.generations()) == 1
        assert repo.catalog.meta(KEY_ID) == sid
    _unbind(state)
    LocalBackend(store).delete(Kind.CONFIG, CONFIG_NAME)  # a store that never had an id
    shutil.rmtree(store / "manifests")
    with Repository(LocalBackend(store), state, CONFIG) as repo:
        assert repo.rebound is not None and "store is new" in repo.rebound.why
        assert repo.generations() == []


def test_an_old_store_without_an_id_gets_one(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "store")
    b.put(Kind.CONFIG, CONFIG_NAME, b'{"format": 1, "created": 1.0}')
    with Repository(b, tmp_path / "state", CONFIG) as repo:
        sid = repo.identity["id"]
        assert isinstance(sid, str) and len(sid) == 32
    assert sid.encode() in LocalBackend(tmp_path / "store").get(Kind.CONFIG, CONFIG_NAME)


def test_an_s3_catalog_of_a_recreated_bucket_is_rebuilt(
    seaweed_private: Seaweed, tmp_path: Path
) -> None:
    sw, state = seaweed_private, tmp_path / "state"
    with Repository(sw.backend("p"), state, CONFIG) as repo:
        checkpoint(repo, "j", {"m": {"r": rand(8, 1)}})
    client = sw.client()
    objs = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": o["Key"]} for o in objs]})
    client.delete_bucket(Bucket=BUCKET)
    with Repository(sw.backend("p"), state, CONFIG) as repo:
        assert repo.generations() == []
        assert repo.rebound is not None and "belongs to store" in repo.rebound.why


def _unbind(state: Path) -> None:
    """Make the catalog look like one written before catalogs were bound."""
    import sqlite3

    with sqlite3.connect(state / "catalog.sqlite") as db:
        db.execute("DELETE FROM meta WHERE key IN (?, ?)", (KEY_ID, KEY_ENDPOINT))
