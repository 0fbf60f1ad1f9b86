"""A store's identity file (`config/store.json`): its format and random id.

The coordinator creates it (coordinator/store/config.py) and announces the id to its
agents; an agent reads it from the store it opened and writes nothing there unless it
matches: a store that answers under the same name but is another one (a new bucket of
that name, another directory mounted there) is never written by mistake. `open_sealed`
opens such an announced store with its key when it is encrypted (the agent's direct data
path and a client's direct read share it).
"""

from __future__ import annotations

import json
from pathlib import Path

from cpcoord.errors import ObjectNotFound, StoreInvalid
from storecore.backend import Backend, Kind
from storecore.crypt import Sealer, load_key

STORE_FORMAT = 1
CONFIG_NAME = "store.json"


def read_store_id(backend: Backend) -> str:
    """The store's id; StoreInvalid when it has no readable identity of our format."""
    try:
        raw = backend.get(Kind.CONFIG, CONFIG_NAME)
    except ObjectNotFound:
        raise StoreInvalid(backend.location, f"no {CONFIG_NAME}: not a cpcoord store") from None
    try:
        ident = json.loads(raw)
        fmt, sid = ident["format"], ident["id"]
    except (ValueError, KeyError, TypeError) as e:
        raise StoreInvalid(backend.location, f"unreadable {CONFIG_NAME}: {e}") from None
    if fmt != STORE_FORMAT or not isinstance(sid, str) or not sid:
        why = f"store format {fmt}, this version reads {STORE_FORMAT}"
        raise StoreInvalid(backend.location, why)
    return sid


def open_announced(location: str, store_id: str) -> Backend:
    """The existing store at `location` (never created), checked to be the one whose id
    a coordinator announced (StoreInvalid naming both otherwise); the caller closes it."""
    from storecore.location import open_backend  # location's backends import nothing here

    backend = open_backend(location, create=False)
    try:
        sid = read_store_id(backend)
        if sid != store_id:
            why = f"its id is {sid}, the coordinator's store is {store_id}"
            raise StoreInvalid(location, why)
    except BaseException:
        backend.close()
        raise
    return backend


def open_sealed(
    location: str,
    store_id: str,
    encrypted: bool,
    key_file: Path | None,
    no_key: str,
    key: bytes = b"",
) -> tuple[Backend, Sealer | None]:
    """The announced store (`open_announced`) and, when it is encrypted, its Sealer: from
    `key` (the coordinator's, sent over mTLS), else the key file or $CPCOORD_STORE_KEY;
    StoreInvalid(location, `no_key`) when there is none. The caller closes the backend."""
    backend = open_announced(location, store_id)
    try:
        sealer = None
        if encrypted:
            sealer = Sealer(key) if key else load_key(key_file)
            if sealer is None:
                raise StoreInvalid(location, no_key)
    except BaseException:
        backend.close()
        raise
    return backend, sealer
