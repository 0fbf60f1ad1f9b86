"""Encryption at rest: AES-256-GCM over chunk blobs (after compression) and manifests.

One master key per store (`--encryption-key-file` or $CPCOORD_STORE_KEY: 32 bytes as 64
hex digits, or a file of 32 raw bytes); each dedup namespace (a job, by default) gets its
own key, HKDF-SHA256(master, "cpcoord chunks " + namespace), manifests one derived with
"cpcoord manifests". Every sealed object carries its own random 96-bit nonce in front of
the ciphertext (nonce || ciphertext || tag, 28 bytes of overhead). The associated data
binds a chunk to its namespace and id, and a manifest to its object name, so blobs cannot
be swapped between chunks, jobs or generations unnoticed. Keys are never logged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cpcoord.errors import DataCorrupted, InvalidArgument

if TYPE_CHECKING:
    from storecore.backend import Buffer

ENV_KEY = "CPCOORD_STORE_KEY"
NONCE = 12
OVERHEAD = NONCE + 16
MANIFEST_MAGIC = b"CPME\x01"  # a sealed manifest; plaintext ones start otherwise


def _derive(master: bytes, info: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)
    return AESGCM(key)


@dataclass(frozen=True)
class Sealer:
    """Seals and opens store objects with keys derived from one master key."""

    master: bytes = field(repr=False)
    _keys: dict[str, AESGCM] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.master) != 32:
            raise InvalidArgument("the store key must be 32 bytes (64 hex digits)")

    def _key(self, label: str) -> AESGCM:
        k = self._keys.get(label)
        if k is None:
            k = self._keys[label] = _derive(self.master, label.encode())
        return k

    def seal_chunks(
        self, namespace: str, ids: Sequence[bytes], blobs: Sequence[bytes | bytearray | memoryview]
    ) -> list[bytes]:
        """One AES-GCM call per chunk (chunks are 4 KiB..4 MiB runs, not single pages)."""
        aes = self._key("cpcoord chunks " + namespace)
        ad = namespace.encode() + b"\0"
        out = []
        for cid, blob in zip(ids, blobs, strict=True):
            nonce = os.urandom(NONCE)
            out.append(nonce + aes.encrypt(nonce, bytes(blob), ad + cid))
        return out

    def open_chunk(self, namespace: str, chunk_id: bytes, blob: Buffer, where: str) -> bytes:
        aes = self._key("cpcoord chunks " + namespace)
        try:
            b = bytes(blob)
            return aes.decrypt(b[:NONCE], b[NONCE:], namespace.encode() + b"\0" + chunk_id)
        except (InvalidTag, ValueError):
            raise DataCorrupted(
                "chunk", chunk_id.hex(), f"in {where}: does not decrypt (wrong key or damaged)"
            ) from None

    def seal_manifest(self, name: str, data: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        ct = self._key("cpcoord manifests").encrypt(nonce, data, name.encode())
        return MANIFEST_MAGIC + nonce + ct

    def open_manifest(self, name: str, data: bytes) -> bytes:
        body = data[len(MANIFEST_MAGIC) :]
        try:
            aes = self._key("cpcoord manifests")
            return aes.decrypt(body[:NONCE], body[NONCE:], name.encode())
        except (InvalidTag, ValueError):
            raise DataCorrupted(
                "manifest", name, "does not decrypt (wrong key or damaged)"
            ) from None


def open_manifest(sealer: Sealer | None, name: str, data: bytes) -> bytes:
    """The plaintext manifest bytes: sealed ones need the key, plaintext ones pass."""
    if not data.startswith(MANIFEST_MAGIC):
        return data
    if sealer is None:
        raise DataCorrupted("manifest", name, "is encrypted and the store has no key")
    return sealer.open_manifest(name, data)


def load_key(path: Path | None = None) -> Sealer | None:
    """The store's Sealer from a key file or $CPCOORD_STORE_KEY; None when neither."""
    if path is not None:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise InvalidArgument(f"cannot read the store key {path}: {e.strerror}") from None
        text = raw.strip()
        if len(raw) != 32:
            try:
                raw = bytes.fromhex(text.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise InvalidArgument(
                    f"store key file {path}: want 32 raw bytes or 64 hex digits"
                ) from None
        return Sealer(raw)
    env = os.environ.get(ENV_KEY, "").strip()
    if not env:
        return None
    try:
        return Sealer(bytes.fromhex(env))
    except ValueError:
        raise InvalidArgument(f"${ENV_KEY}: want 64 hex digits") from None
