"""The catalog: jobs, members and generations in SQLite (WAL mode, synchronous=FULL).

A generation row is the single point of truth for visibility: a generation exists for
readers exactly when its row says COMMITTED, and that flip is one transaction, made only
after its packs and manifest are durable. States: PREPARING (allocated, in flight) ->
COMMITTED | ABORTED (with a reason). Rows of generations dropped by retention are
deleted; generation numbers come from a per-job counter and are never reused.

Thread-safe: one connection, every call under one lock, each mutation one transaction.
The schema and the row values are in catalog_rows.py.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from coordinator.store.catalog_rows import (
    GEN_COLS,
    SCHEMA,
    SCHEMA_VERSION,
    GenerationInfo,
    Level,
    MemberInfo,
    Sizes,
    State,
    generation_of,
)
from cpcoord.errors import GenerationStateError, NoSuchGeneration, StoreError, StoreInvalid

__all__ = ["Catalog", "GenerationInfo", "Level", "MemberInfo", "Sizes", "State"]


class Catalog:
    """SQLite catalog (see the module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            fresh = not self.path.exists()
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            if fresh:
                self.path.chmod(0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: the commit flip must survive power loss, not only a process crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(generations)")}
            if "level" not in cols:  # a catalog older than levels: all of it is in the store
                self._db.execute(
                    "ALTER TABLE generations ADD COLUMN level TEXT NOT NULL DEFAULT 'store'"
                )
            row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreInvalid(self.path, f"catalog schema {row[0]}, expected {SCHEMA_VERSION}")
        except sqlite3.Error as e:
            raise StoreInvalid(self.path, f"cannot open the catalog: {e}") from e
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreError(f"catalog: {e}") from e

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"catalog: {e}") from e

    # -- meta: what the catalog is bound to (binding.py) --------------------------

    def meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, values: dict[str, str]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    def empty(self) -> bool:
        """No job (hence no member and no generation) was ever recorded."""
        return not self._query("SELECT 1 FROM jobs LIMIT 1")

    # -- jobs and members ----------------------------------------------------------

    def ensure_job(self, job: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (name, created) VALUES (?, ?)", (job, time.time())
            )

    def jobs(self) -> list[str]:
        return [r[0] for r in self._query("SELECT name FROM jobs ORDER BY name")]

    def add_member(self, job: str, name: str, info: str = "{}") -> bool:
        """Register a member; False if it already exists (nothing changed)."""
        self.ensure_job(job)
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO members (job_id, name, created, info) "
                "SELECT id, ?, ?, ? FROM jobs WHERE name = ?",
                (name, time.time(), info, job),
            )
            return cur.rowcount == 1

    def remove_member(self, job: str, name: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM members WHERE name = ? AND "
                "job_id = (SELECT id FROM jobs WHERE name = ?)",
                (name, job),
            )
            return cur.rowcount == 1

    def set_member_info(self, job: str, name: str, info: str) -> bool:
        """Replace a member's info JSON; False if there is no such member."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE members SET info = ? WHERE name = ? AND "
                "job_id = (SELECT id FROM jobs WHERE name = ?)",
                (info, name, job),
            )
            return cur.rowcount == 1

    def set_member_infos(self, items: Sequence[tuple[str, str, str]]) -> int:
        """(job, name, info) for many members in one transaction; returns rows changed."""
        with self._tx() as db:
            cur = db.executemany(
                "UPDATE members SET info = ? WHERE name = ? AND "
                "job_id = (SELECT id FROM jobs WHERE name = ?)",
                [(info, name, job) for job, name, info in items],
            )
            return cur.rowcount

    def members(self, job: str) -> list[MemberInfo]:
        rows = self._query(
            "SELECT j.name, m.name, m.created, m.info FROM members m "
            "JOIN jobs j ON j.id = m.job_id WHERE j.name = ? ORDER BY m.name",
            (job,),
        )
        return [MemberInfo(*r) for r in rows]

    # -- generations ---------------------------------------------------------------

    def allocate(self, job: str, parent: int | None, namespace: str) -> int:
        """A new PREPARING generation; its number is never reused."""
        self.ensure_job(job)
        with self._tx() as db:
            jid, number = db.execute(
                "SELECT id, next_generation FROM jobs WHERE name = ?", (job,)
            ).fetchone()
            db.execute("UPDATE jobs SET next_generation = ? WHERE id = ?", (number + 1, jid))
            db.execute(
                "INSERT INTO generations (job_id, number, parent, state, started, namespace) "
                "VALUES (?, ?, ?, 'PREPARING', ?, ?)",
                (jid, number, parent, time.time(), namespace),
            )
            return int(number)

    def get(self, job: str, number: int) -> GenerationInfo:
        rows = self._query(
            f"SELECT {GEN_COLS} FROM generations g JOIN jobs j ON j.id = g.job_id "
            "WHERE j.name = ? AND g.number = ?",
            (job, number),
        )
        if not rows:
            raise NoSuchGeneration(number, job)
        return generation_of(rows[0])

    def generations(
        self, job: str | None = None, state: State | None = None
    ) -> list[GenerationInfo]:
        where, args = [], []
        if job is not None:
            where.append("j.name = ?")
            args.append(job)
        if state is not None:
            where.append("g.state = ?")
            args.append(state.value)
        sql = f"SELECT {GEN_COLS} FROM generations g JOIN jobs j ON j.id = g.job_id"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._query(sql + " ORDER BY j.name, g.number", tuple(args))
        return [generation_of(r) for r in rows]

    def _set_state(
        self, db: sqlite3.Connection, job: str, number: int, sql: str, args: tuple, verb: str
    ) -> None:
        row = db.execute(
            "SELECT g.state FROM generations g JOIN jobs j ON j.id = g.job_id "
            "WHERE j.name = ? AND g.number = ?",
            (job, number),
        ).fetchone()
        if row is None:
            raise NoSuchGeneration(number, job)
        if row[0] != State.PREPARING:
            raise GenerationStateError(number, job, verb, f"it is {row[0]}")
        db.execute(
            f"UPDATE generations SET {sql} WHERE number = ? AND "
            "job_id = (SELECT id FROM jobs WHERE name = ?)",
            (*args, number, job),
        )

    def commit(
        self, job: str, number: int, manifest: str, sizes: Sizes,
        level: Level = Level.STORE, also: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:  # fmt: skip
        """PREPARING -> COMMITTED with its manifest name, sizes and level, in one
        transaction (with `also`'s writes: the cached packs of a local generation)."""
        with self._tx() as db:
            self._set_state(
                db, job, number,
                "state='COMMITTED', finished=?, manifest=?, members=?, pages=?, zero_pages=?, "
                "bytes_logical=?, bytes_stored=?, bytes_new=?, level=?",
                (time.time(), manifest, sizes.members, sizes.pages, sizes.zero_pages,
                 sizes.bytes_logical, sizes.bytes_stored, sizes.bytes_new, level.value),
                "commit",
            )  # fmt: skip
            if also is not None:
                also(db)

    def tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One transaction (for the catalog's satellite tables, coordinator/levels.py)."""
        return self._tx()

    def abort(self, job: str, number: int, reason: str) -> None:
        with self._tx() as db:
            self._set_state(
                db,
                job,
                number,
                "state='ABORTED', finished=?, reason=?",
                (time.time(), reason),
                "abort",
            )

    def abort_all_preparing(self, reason: str) -> list[tuple[str, int]]:
        """Abort every PREPARING generation (after a restart nothing can finish them)."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT j.name, g.number FROM generations g JOIN jobs j ON j.id = g.job_id "
                "WHERE g.state = 'PREPARING'"
            ).fetchall()
            db.execute(
                "UPDATE generations SET state='ABORTED', finished=?, reason=? "
                "WHERE state='PREPARING'",
                (time.time(), reason),
            )
            return [(r[0], int(r[1])) for r in rows]

    def set_pinned(self, job: str, number: int, pinned: bool) -> None:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE generations SET pinned = ? WHERE number = ? AND state = 'COMMITTED' AND "
                "job_id = (SELECT id FROM jobs WHERE name = ?)",
                (int(pinned), number, job),
            )
            if cur.rowcount != 1:
                raise NoSuchGeneration(number, job)

    def delete(
        self,
        job: str,
        numbers: list[int],
        also: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """Delete committed or aborted generation rows (retention); one transaction,
        with `also` (the satellite tables' rows of those generations: cached.py)."""
        with self._tx() as db:
            for n in numbers:
                db.execute(
                    "DELETE FROM generations WHERE number = ? AND state != 'PREPARING' AND "
                    "job_id = (SELECT id FROM jobs WHERE name = ?)",
                    (n, job),
                )
            if also is not None:
                also(db)

    def restore_committed(self, info: GenerationInfo) -> bool:
        """Insert a COMMITTED row rebuilt from its manifest (rebuild.py). False, changing
        nothing, if the job has a generation of that number; the job's counter moves
        past it, so numbers stay unique."""
        self.ensure_job(info.job)
        z = info.sizes
        with self._tx() as db:
            jid, nxt = db.execute(
                "SELECT id, next_generation FROM jobs WHERE name = ?", (info.job,)
            ).fetchone()
            if db.execute(
                "SELECT 1 FROM generations WHERE job_id = ? AND number = ?", (jid, info.number)
            ).fetchone():
                return False
            db.execute(
                "INSERT INTO generations (job_id, number, parent, state, started, finished, "
                "manifest, namespace, members, pages, zero_pages, bytes_logical, bytes_stored, "
                "bytes_new, pinned) VALUES (?, ?, ?, 'COMMITTED', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (jid, info.number, info.parent, info.started, info.finished, info.manifest,
                 info.namespace, z.members, z.pages, z.zero_pages, z.bytes_logical,
                 z.bytes_stored, z.bytes_new, int(info.pinned)),
            )  # fmt: skip
            if info.number >= nxt:
                db.execute(
                    "UPDATE jobs SET next_generation = ? WHERE id = ?", (info.number + 1, jid)
                )
            return True

    def committed_manifests(self) -> set[str]:
        rows = self._query("SELECT manifest FROM generations WHERE state = 'COMMITTED'")
        return {r[0] for r in rows if r[0]}
