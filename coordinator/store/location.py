"""Opening the repository of a store location (the location itself, its grammar and
its backend are storecore/location.py's).

The grammar of a location (a directory, file://PATH or s3://BUCKET[/PREFIX]; endpoint
and credentials from the standard AWS variables) is storecore/location.py's.

A local store keeps its catalog and lock inside its directory. An S3 store keeps them
in a local state directory (default: $CPCOORD_STATE_DIR, else /var/lib/cpcoord for root,
else $XDG_STATE_HOME/cpcoord or ~/.local/state/cpcoord; then s3/BUCKET[+PREFIX] with
'/' as '+'). When that catalog is new, `open_repository` rebuilds it from the committed
manifests in the bucket (rebuild.py), so a coordinator can move to another machine.
A catalog is bound to its store's id and endpoint (binding.py): kept by bucket and
prefix only, it would otherwise describe whatever bucket of that name answers next.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.store.config import StoreConfig
from coordinator.store.rebuild import RebuildReport, rebuild_if_new
from coordinator.store.repository import Repository
from storecore.location import StoreLocation, as_location, open_backend
from storecore.s3_options import S3Options

__all__ = ["StoreLocation", "as_location", "open_backend", "open_repository"]


def open_repository(
    where: StoreLocation | str | Path,
    *,
    state_dir: Path | str | None = None,
    config: StoreConfig | None = None,
    s3_options: S3Options | None = None,
) -> tuple[Repository, RebuildReport | None]:
    """Open the repository at a location; if its catalog is new (or was another store's,
    binding.py) while the store holds manifests, rebuild the catalog from them first
    (the report says what was found)."""
    loc = as_location(where)
    backend = open_backend(loc, s3_options=s3_options)
    try:
        repo = Repository(backend, state_dir or loc.default_state_dir(), config)
    except BaseException:
        backend.close()
        raise
    if repo.rebound is not None:  # its catalog was another store's: rebuilt already
        return repo, repo.rebuilt
    try:
        report = rebuild_if_new(repo)
    except BaseException:
        repo.close()
        raise
    return repo, report
