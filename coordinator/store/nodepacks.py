"""Packs that agents put themselves (the direct data path), and the trust rule that keeps
one node's bytes from serving another node until the coordinator has checked them.

Taking a report (`take`): an agent says it put pack `nodes/NODE/ID` of `size` bytes with
chunk ids `ids`. The coordinator accepts it only if the name is under the reporting
node's prefix, the object exists with that size (durable: a put is atomic and durable
on return, storecore/backend.py), its trailer parses and lists exactly those ids in the
generation's namespace, and a sample of its chunks (SAMPLE per pack) decodes to their
ids. Then the pack is indexed, its ids claimed for the generation (kept from gc), and
remembered on the flight. Any refusal is bad data of that node (InvalidArgument or
ChunkMismatch: the upload stream is refused and the generation aborts with bad_data).

The trust rule (`resolve`): a chunk indexed only in a pack of node A counts as present
for node B (or the coordinator) only once the coordinator has read it back and checked
its BLAKE3 (`verified`), which it does the first time another node wants it, not for
every upload. A chunk that fails is removed from the index (the generation asking
uploads it again), its pack is remembered as lying, and a generation in flight that
reported it is marked bad (its commit fails with NodeDataBad: bad_data of that node).
Reads always re-hash (reader.py), so a lying pack can fail a read but never make one
return wrong bytes; verification keeps node B's generations from depending on bytes
only node A vouched for. Verified ids live in memory: after a restart they are checked
again when wanted.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from cpcoord.errors import ChunkMismatch, DataCorrupted, InvalidArgument, ObjectNotFound
from cpcoord.log import log_event
from storecore import packs
from storecore.backend import Kind
from storecore.ids import ID_DTYPE, IdArray, as_id_array, member_of, sort_ids, unique_ids
from storecore.names import node_of, node_prefix, pack_id

if TYPE_CHECKING:
    from coordinator.store.index import Locations
    from coordinator.store.inflight import InFlight
    from coordinator.store.parts import StoreParts

log = logging.getLogger("cpcoord.store.nodepacks")
SAMPLE = 2  # chunks per reported pack read back and checked at once


@dataclass(frozen=True)
class Report:
    """One pack as an agent reported it."""

    name: str
    size: int
    ids: bytes
    cached: bool = False  # in the agent's node cache, not the store (drain.py)


@dataclass(frozen=True)
class Taken:
    """A checked report, ready to index."""

    name: str
    id: bytes
    size: int
    contents: packs.PackContents


@dataclass
class Trust:
    """Ids of agents' chunks the coordinator has checked, per namespace, and packs found
    lying. Guarded by the repository lock."""

    verified: dict[str, list[IdArray]] = field(default_factory=dict)
    lying: set[str] = field(default_factory=set)
    checked: int = 0  # chunks read back and checked across nodes (metrics)
    failed: int = 0

    def sorted(self, namespace: str) -> IdArray:
        parts = self.verified.get(namespace)
        if not parts:
            return np.zeros(0, ID_DTYPE)
        if len(parts) > 1:
            parts[:] = [unique_ids(np.concatenate(parts))]
        return parts[0]

    def add(self, namespace: str, ids: IdArray) -> None:
        if ids.size:
            self.verified.setdefault(namespace, []).append(unique_ids(ids))


def check(repo: StoreParts, node: str, namespace: str, r: Report) -> Taken:
    """Check one report against the store (see the module docstring); outside the lock."""
    if not r.name.startswith(node_prefix(node)) or node_of(r.name) != node:
        raise InvalidArgument(f"pack {r.name!r} is not under node {node}'s prefix")
    pid = pack_id(r.name)
    try:
        size, contents = packs.read_sized_contents(repo.backend, r.name)
    except (ObjectNotFound, DataCorrupted) as e:  # the agent's fault; other errors: ours
        raise InvalidArgument(f"reported pack {r.name} is not usable: {e}") from None
    if size != r.size:
        raise InvalidArgument(f"pack {r.name} has {size} bytes, reported {r.size}")
    if contents.namespace != namespace:
        raise InvalidArgument(f"pack {r.name} is of namespace {contents.namespace!r}")
    ids = as_id_array(r.ids)
    listed = np.ascontiguousarray(contents.entries["id"])
    if ids.size != listed.size or not np.array_equal(sort_ids(ids), sort_ids(listed)):
        raise InvalidArgument(f"pack {r.name} holds other chunks than reported")
    bad = _bad_rows(repo, r.name, contents.entries[sample(len(contents.entries))], namespace)
    if bad:
        raise ChunkMismatch(bad[0], "something else")
    return Taken(r.name, pid, size, contents)


def sample(n: int) -> npt.NDArray[np.int64]:
    """Indices of the entries to read back: SAMPLE consecutive ones from a uniformly
    random start, wrapping around (every entry is picked with probability SAMPLE/n, as
    with independent picks), so that they are usually one ranged read, not SAMPLE."""
    if n <= SAMPLE:
        return np.arange(n, dtype=np.int64)
    k = secrets.randbelow(n)  # unpredictable to the agent; a new default_rng cost ~0.3 ms
    return np.sort((k + np.arange(SAMPLE, dtype=np.int64)) % n)


def _bad_rows(repo: StoreParts, name: str, rows: packs.Entries, ns: str) -> list[str]:
    """Read the given entries of a pack back and check them; the ids that fail (hex).
    Adjacent entries (offsets are cumulative, packs._locate) are read at once."""
    bad = []
    for run in np.split(rows, np.flatnonzero(rows["offset"][1:] != _ends(rows)[:-1]) + 1):
        if not len(run):
            continue
        start = int(run["offset"][0])
        try:
            data = repo.backend.get_range(Kind.PACKS, name, start, int(_ends(run)[-1]) - start)
        except DataCorrupted:  # a store that fails to answer is a store error, raised
            bad.append(run["id"][0].tobytes().hex())
            continue
        for e in run:
            cid, at = e["id"].tobytes(), int(e["offset"]) - start
            try:
                blob = data[at : at + int(e["stored"])]
                packs.decode_chunk(
                    int(e["method"]), blob, int(e["raw"]), cid, name, repo.config.sealer, ns
                )
            except DataCorrupted:
                bad.append(cid.hex())
    return bad


def _ends(rows: packs.Entries) -> npt.NDArray[np.uint64]:
    return rows["offset"].astype(np.uint64) + rows["stored"].astype(np.uint64)


def take(repo: StoreParts, g: InFlight, node: str, reports: Sequence[Report]) -> tuple[int, int]:
    """Check reports (outside the lock; on a remote store several packs at once) and
    index them for `g`; (chunks, bytes)."""
    with repo.lock:
        known = {t.name for t in g.packs}  # several members' streams report one pack
    fresh = [r for r in {r.name: r for r in reports}.values() if r.name not in known]
    # Where reads cross a network (S3, a shared file system) the reads of several packs
    # overlap (a stream's last report) on the pool. On a local directory handing them to
    # threads cost more CPU than it saved: the coordinator's threads took 0.092-0.104 CPU
    # s per full checkpoint of 1 GiB inline against 0.106-0.115 with the pool (4
    # interleaved pairs of runs, every pair lower inline; 15-40% fewer context switches).
    if len(fresh) > 1 and repo.backend.remote:
        taken = list(_pool().map(lambda r: check(repo, node, g.namespace, r), fresh))
    else:
        taken = [check(repo, node, g.namespace, r) for r in fresh]
    with repo.lock:
        return index_taken(repo, g, taken)


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
CHECK_THREADS = 4


def _pool() -> ThreadPoolExecutor:
    """Threads that check one report's packs at once (shared by every stream)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="packcheck")
        return _POOL


def index_taken(repo: StoreParts, g: InFlight, taken: Sequence[Taken]) -> tuple[int, int]:
    """Index checked packs for generation `g` (caller holds the lock); (chunks, bytes)."""
    chunks = nbytes = 0
    known = {t.name for t in g.packs}
    new: list[Taken] = []
    for t in taken:
        if t.name in known:  # taken meanwhile from another member's stream
            continue
        known.add(t.name)
        if t.name in repo.trust.lying:
            raise InvalidArgument(f"pack {t.name} was found lying before")
        new.append(t)
    if not new:
        return 0, 0
    # One index insert for the report's packs (an insert merges sorted runs: per pack,
    # it was most of the cost of taking one).
    repo.index.add_packs([(t.id, t.size, t.contents, t.name) for t in new])
    for t in new:
        no = repo.index.pack_number(t.name)
        assert no is not None
        repo.unindexed.append(no)
        repo.recent_puts.add(t.name)
        g.packs.append(t)
        chunks += len(t.contents.entries)
        nbytes += t.contents.blob_bytes
    g.claim(np.concatenate([np.ascontiguousarray(t.contents.entries["id"]) for t in new]))
    g.chunks_new += chunks
    g.bytes_new += nbytes
    return chunks, nbytes


def foreign(
    repo: StoreParts, namespace: str, ids: IdArray, found: npt.NDArray[np.bool_],
    locs: Locations, node: str | None,
) -> npt.NDArray[np.bool_]:  # fmt: skip
    """Which found ids are served only by another node's pack and not verified yet
    (`node` None: the coordinator's own view, every node's pack is foreign)."""
    out = np.zeros(ids.size, dtype=bool)
    if not found.any():
        return out
    pk = locs["pack"]
    nos = np.unique(pk[found])
    theirs = [int(n) for n in nos if repo.index.pack(int(n)).node not in (None, node)]
    if not theirs:
        return out
    out = found & np.isin(pk, np.asarray(theirs, dtype=pk.dtype))
    sel = np.flatnonzero(out)
    out[sel[member_of(ids[sel], repo.trust.sorted(namespace))]] = False
    return out


def verify(
    repo: StoreParts, namespace: str, ids: IdArray, locs: Locations
) -> tuple[IdArray, list[tuple[str, IdArray]]]:
    """Read back and check chunks at the given locations (outside the lock): (the good
    ids, [(pack name, its bad ids)])."""
    good: list[bytes] = []
    bad: dict[str, list[bytes]] = {}
    pk = locs["pack"]
    with repo.lock:
        names = {int(n): repo.index.pack(int(n)).name for n in np.unique(pk)}
    for i in range(ids.size):  # one per chunk (up to 1024 pages), once per chunk ever
        e, name, cid = locs[i], names[int(pk[i])], ids[i].tobytes()
        try:
            blob = repo.backend.get_range(Kind.PACKS, name, int(e["offset"]), int(e["stored"]))
            packs.decode_chunk(
                int(e["method"]), blob, int(e["raw"]), cid, name, repo.config.sealer, namespace
            )
            good.append(cid)
        except (DataCorrupted, ObjectNotFound):  # gone or wrong: not to be served
            bad.setdefault(name, []).append(cid)
    return as_id_array(good), [(n, as_id_array(b)) for n, b in bad.items()]


def settle(repo: StoreParts, namespace: str, good: IdArray, bad: list[tuple[str, IdArray]]) -> None:
    """Record a verification (caller holds the lock): good ids are trusted from now on;
    bad ones leave the index (other copies in packs of generations in flight take
    their place) and mark their pack lying and its generation in flight bad."""
    repo.trust.add(namespace, good)
    repo.trust.checked += int(good.size) + sum(int(b.size) for _, b in bad)
    if not bad:
        return
    ci = repo.index.chunks(namespace)
    for name, ids in bad:
        repo.trust.failed += int(ids.size)
        repo.trust.lying.add(name)
        ci.remove(ids)
        who = node_of(name) or "?"
        log_event(
            log, logging.WARNING, "a node's chunks do not match their ids", node=who, pack=name,
            chunks=int(ids.size), first=ids[0].tobytes().hex(),
        )  # fmt: skip
        for g in repo.inflight.all():
            if any(t.name == name for t in g.packs):
                g.bad[who] = f"pack {name}: chunk {ids[0].tobytes().hex()} does not match"
    for g in repo.inflight.all():  # honest copies of the removed ids serve again
        for t in g.packs:
            if t.name not in repo.trust.lying:
                repo.index.add_pack(t.id, t.size, t.contents, t.name)
