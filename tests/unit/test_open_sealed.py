"""storecore.identity.open_sealed, the one key check of a direct reader (client) and the
agent's direct data path: an encrypted store opens only with a key (sent, a key file or
$CPCOORD_STORE_KEY), refuses with a clear StoreInvalid otherwise and closes what it
opened; a plain store needs none."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.store.config import load_or_init_identity
from cpcoord.errors import StoreInvalid
from storecore import identity
from storecore.backend import LocalBackend

KEY = bytes(range(32))


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, list[bool]]:
    """(location, id, closes): a store with an identity; `closes` records each close of a
    backend open_sealed opened."""
    monkeypatch.delenv("CPCOORD_STORE_KEY", raising=False)
    root = tmp_path / "store"
    b = LocalBackend(root)
    ident, _ = load_or_init_identity(b)
    b.close()
    closes: list[bool] = []
    real = identity.open_announced

    def tracked(location: str, store_id: str) -> LocalBackend:
        backend = real(location, store_id)
        close = backend.close

        def recorded() -> None:
            closes.append(True)
            close()

        backend.close = recorded  # type: ignore[method-assign]
        return backend  # type: ignore[return-value]

    monkeypatch.setattr(identity, "open_announced", tracked)
    return str(root), str(ident["id"]), closes


def test_a_plain_store_needs_no_key(store: tuple[str, str, list[bool]]) -> None:
    loc, sid, closes = store
    backend, sealer = identity.open_sealed(loc, sid, False, None, "no key")
    assert sealer is None
    backend.close()
    assert closes == [True]


def test_an_encrypted_store_without_a_key_is_refused_and_closed(
    store: tuple[str, str, list[bool]],
) -> None:
    loc, sid, closes = store
    with pytest.raises(StoreInvalid, match="give its key file"):
        identity.open_sealed(loc, sid, True, None, "give its key file")
    assert closes == [True]


def test_a_sent_key_comes_before_the_key_file(
    store: tuple[str, str, list[bool]], tmp_path: Path
) -> None:
    loc, sid, _ = store
    kf = tmp_path / "key"
    kf.write_text((b"\x01" * 32).hex())
    _, sent = identity.open_sealed(loc, sid, True, kf, "no key", KEY)
    _, filed = identity.open_sealed(loc, sid, True, kf, "no key")
    assert sent is not None and sent.master == KEY
    assert filed is not None and filed.master == b"\x01" * 32


def test_the_environment_key(
    store: tuple[str, str, list[bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    loc, sid, _ = store
    monkeypatch.setenv("CPCOORD_STORE_KEY", KEY.hex())
    _, sealer = identity.open_sealed(loc, sid, True, None, "no key")
    assert sealer is not None and sealer.master == KEY
