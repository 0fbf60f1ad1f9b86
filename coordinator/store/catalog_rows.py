"""The catalog's rows: its SQLite schema and the frozen values rows become (generation
states and durability levels, sizes, a generation's and a member's info). catalog.py
holds the connection and the statements; these names are importable from there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    next_generation INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS members (
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    created REAL NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS generations (
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    parent INTEGER,
    state TEXT NOT NULL CHECK (state IN ('PREPARING', 'COMMITTED', 'ABORTED')),
    reason TEXT NOT NULL DEFAULT '',
    started REAL NOT NULL,
    finished REAL,
    manifest TEXT,
    namespace TEXT NOT NULL DEFAULT '',
    members INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    zero_pages INTEGER NOT NULL DEFAULT 0,
    bytes_logical INTEGER NOT NULL DEFAULT 0,
    bytes_stored INTEGER NOT NULL DEFAULT 0,
    bytes_new INTEGER NOT NULL DEFAULT 0,
    pinned INTEGER NOT NULL DEFAULT 0,
    level TEXT NOT NULL DEFAULT 'store',
    PRIMARY KEY (job_id, number)
);
CREATE INDEX IF NOT EXISTS generations_by_state ON generations (state);
"""


class State(StrEnum):
    PREPARING = "PREPARING"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"


class Level(StrEnum):
    """A committed generation's durability level (docs/multilevel.md); only rises."""

    LOCAL = "local"
    PARTNER = "partner"
    STORE = "store"

    @property
    def rank(self) -> int:
        return _LEVEL_RANK[self]


_LEVEL_RANK = {Level.LOCAL: 0, Level.PARTNER: 1, Level.STORE: 2}


@dataclass(frozen=True)
class Sizes:
    members: int = 0
    pages: int = 0  # pages in the manifest, zero pages included
    zero_pages: int = 0
    bytes_logical: int = 0  # pages * page size
    bytes_stored: int = 0  # stored bytes of the distinct chunks it references
    bytes_new: int = 0  # stored bytes of chunks this generation added


@dataclass(frozen=True)
class GenerationInfo:
    job: str
    number: int
    parent: int | None
    state: State
    reason: str
    started: float
    finished: float | None
    manifest: str | None
    namespace: str
    pinned: bool
    sizes: Sizes
    level: Level = Level.STORE


@dataclass(frozen=True)
class MemberInfo:
    job: str
    name: str
    created: float
    info: str  # JSON, owned by the coordinator


GEN_COLS = (
    "j.name, g.number, g.parent, g.state, g.reason, g.started, g.finished, g.manifest, "
    "g.namespace, g.pinned, g.members, g.pages, g.zero_pages, g.bytes_logical, "
    "g.bytes_stored, g.bytes_new, g.level"
)


def generation_of(row: tuple) -> GenerationInfo:
    return GenerationInfo(
        job=row[0],
        number=row[1],
        parent=row[2],
        state=State(row[3]),
        reason=row[4],
        started=row[5],
        finished=row[6],
        manifest=row[7],
        namespace=row[8],
        pinned=bool(row[9]),
        sizes=Sizes(*row[10:16]),
        level=Level(row[16]),
    )
