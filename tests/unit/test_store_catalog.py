"""The SQLite catalog: states, numbering, members, pins, durability settings."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from coordinator.store.catalog import Catalog, Sizes, State
from cpcoord.errors import GenerationStateError, NoSuchGeneration


@pytest.fixture
def cat(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "c.sqlite")


def test_wal_full_sync_owner_only(cat: Catalog) -> None:
    assert cat._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert cat._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert stat.S_IMODE(cat.path.stat().st_mode) == 0o600


def test_generation_lifecycle(cat: Catalog) -> None:
    n1 = cat.allocate("j", None, "job:j")
    assert n1 == 1 and cat.get("j", 1).state is State.PREPARING
    cat.commit("j", 1, "j/0000000001", Sizes(members=2, pages=10, bytes_logical=40960))
    g = cat.get("j", 1)
    assert g.state is State.COMMITTED and g.manifest == "j/0000000001"
    assert g.sizes.pages == 10 and g.finished is not None
    with pytest.raises(GenerationStateError):
        cat.commit("j", 1, "x", Sizes())
    with pytest.raises(GenerationStateError):
        cat.abort("j", 1, "late")
    n2 = cat.allocate("j", 1, "job:j")
    cat.abort("j", n2, "agent lost")
    assert cat.get("j", n2).state is State.ABORTED and cat.get("j", n2).reason == "agent lost"
    assert [g.number for g in cat.generations("j", State.COMMITTED)] == [1]
    with pytest.raises(NoSuchGeneration):
        cat.get("j", 99)
    with pytest.raises(NoSuchGeneration):
        cat.commit("nojob", 1, "x", Sizes())


def test_numbers_are_never_reused(cat: Catalog) -> None:
    for _ in range(3):
        cat.allocate("j", None, "")
    cat.abort("j", 3, "x")
    cat.delete("j", [3])
    assert cat.allocate("j", None, "") == 4
    assert cat.allocate("k", None, "") == 1  # per job


def test_abort_all_preparing(cat: Catalog) -> None:
    cat.allocate("a", None, "")
    cat.allocate("b", None, "")
    cat.commit("b", 1, "b/1", Sizes())
    cat.allocate("b", 1, "")
    assert sorted(cat.abort_all_preparing("restart")) == [("a", 1), ("b", 2)]
    assert cat.get("b", 1).state is State.COMMITTED
    assert cat.get("b", 2).reason == "restart"


def test_pin_and_delete(cat: Catalog) -> None:
    cat.allocate("j", None, "")
    with pytest.raises(NoSuchGeneration):
        cat.set_pinned("j", 1, True)  # only committed generations pin
    cat.commit("j", 1, "j/1", Sizes())
    cat.set_pinned("j", 1, True)
    assert cat.get("j", 1).pinned
    cat.allocate("j", 1, "")
    cat.delete("j", [1, 2])  # PREPARING rows are never deleted
    assert [g.number for g in cat.generations("j")] == [2]
    assert cat.committed_manifests() == set()


def test_members(cat: Catalog) -> None:
    assert cat.add_member("j", "rank-0", '{"node": "n1"}')
    assert not cat.add_member("j", "rank-0")  # duplicate: nothing changes
    assert cat.add_member("j", "rank-1")
    assert [m.name for m in cat.members("j")] == ["rank-0", "rank-1"]
    assert cat.members("j")[0].info == '{"node": "n1"}'
    assert cat.remove_member("j", "rank-0") and not cat.remove_member("j", "rank-0")
    assert cat.jobs() == ["j"]


def test_concurrent_allocations_are_distinct(cat: Catalog) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(20):
            n = cat.allocate("j", None, "")
            with lock:
                got.append(n)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 81))


def test_reopen_keeps_state(tmp_path: Path) -> None:
    c = Catalog(tmp_path / "c.sqlite")
    c.allocate("j", None, "ns")
    c.commit("j", 1, "j/1", Sizes(pages=3))
    c.close()
    c2 = Catalog(tmp_path / "c.sqlite")
    assert c2.get("j", 1).sizes.pages == 3 and c2.get("j", 1).namespace == "ns"


def test_level_defaults_to_store_and_old_catalogs_read_as_store(tmp_path: Path) -> None:
    """A catalog written before levels has no `level` column: opening it adds one, and
    every generation it holds reads as `store` (it was in the store when it committed)."""
    import sqlite3

    from coordinator.store.catalog import Level

    path = tmp_path / "old.sqlite"
    cat = Catalog(path)
    cat.allocate("j", None, "job:j")
    cat.commit("j", 1, "j/0000000001", Sizes(members=1))
    cat.allocate("j", 1, "job:j")
    cat.commit("j", 2, "j/0000000002", Sizes(members=1), level=Level.LOCAL)
    assert [g.level for g in cat.generations("j")] == [Level.STORE, Level.LOCAL]
    cat.close()
    db = sqlite3.connect(path)  # make it an older catalog: drop the column
    db.execute("ALTER TABLE generations DROP COLUMN level")
    db.commit()
    db.close()
    again = Catalog(path)
    assert [g.level for g in again.generations("j")] == [Level.STORE, Level.STORE]
    assert again.get("j", 2).state is State.COMMITTED
    again.close()
