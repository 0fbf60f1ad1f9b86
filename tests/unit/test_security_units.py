"""Pure logic of the security parts: token files, the role table, the loopback rule,
the start-up checks, and the store sealer (tampering, wrong keys, key loading)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.auth import Security, check_transport, is_loopback, required_role
from cpcoord.errors import (
    DataCorrupted,
    InsecureRefused,
    InvalidArgument,
    PlaintextBindRefused,
    TlsConfigInvalid,
    TokensInvalid,
)
from cpcoord.tls import TlsFiles, tls_files, token_digest
from cpcoord.tokens import bearer, load_tokens, role_of
from storecore.crypt import MANIFEST_MAGIC, Sealer, load_key, open_manifest


def test_token_file_and_roles(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# c\n\nadmin sha256:{token_digest('a' * 20)}\nviewer {token_digest('v')}\n")
    tokens = load_tokens(f)
    assert role_of(tokens, "a" * 20) == "admin" and role_of(tokens, "v") == "viewer"
    assert role_of(tokens, "x") is None
    for bad in ("root abc\n", f"admin {'0' * 63}\n", "admin\n", "# only a comment\n"):
        f.write_text(bad)
        with pytest.raises(TokensInvalid):
            load_tokens(f)
    assert bearer([("authorization", "Bearer t0k")]) == "t0k"
    assert bearer([("authorization", "Basic x")]) is None


def test_role_table() -> None:
    assert required_role("/grpc.health.v1.Health/Check") is None
    assert required_role("/cpcoord.v1.AgentControl/Attach") == {"agent"}
    for m in ("Checkpoint", "Restore", "DeleteGeneration", "GarbageCollect", "ReadGeneration"):
        assert required_role(f"/cpcoord.v1.Coordinator/{m}") == {"admin"}
    assert required_role("/cpcoord.v1.Coordinator/ListJobs") == {"admin", "viewer"}


def test_transport_rules(tmp_path: Path) -> None:
    for addr in ("127.0.0.1:1", "[::1]:1", "localhost:1", "127.9.9.9:1"):
        assert is_loopback(addr)
    for addr in ("0.0.0.0:1", ":1", "[::]:1", "10.0.0.1:1", "example.com:1"):
        assert not is_loopback(addr)
    with pytest.raises(InsecureRefused):
        check_transport("127.0.0.1:1", Security())
    with pytest.raises(PlaintextBindRefused):
        check_transport("0.0.0.0:1", Security(insecure=True))
    check_transport("0.0.0.0:1", Security(insecure=True, bind_any=True))
    t = TlsFiles(tmp_path / "c", tmp_path / "k", tmp_path / "a")
    check_transport("0.0.0.0:1", Security(tls=t))
    with pytest.raises(TlsConfigInvalid):
        tls_files(tmp_path / "c", None, None)
    with pytest.raises(TlsConfigInvalid):
        t.read()  # missing files: a clear error, not a gRPC crash


def test_sealer_binds_namespace_and_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Sealer(b"k" * 32)
    ids = [b"\x01" * 32, b"\x02" * 32]
    blobs = s.seal_chunks("job:a", ids, [b"secret one", b"secret two"])
    assert all(b"secret" not in b for b in blobs)
    assert blobs[0][:12] != blobs[1][:12]  # a nonce per chunk
    assert s.open_chunk("job:a", ids[0], blobs[0], "p") == b"secret one"
    for ns, cid, blob in (
        ("job:b", ids[0], blobs[0]),  # another job's key
        ("job:a", ids[1], blobs[0]),  # swapped between chunks
        ("job:a", ids[0], blobs[0][:-1] + bytes([blobs[0][-1] ^ 1])),  # tampered
    ):
        with pytest.raises(DataCorrupted):
            s.open_chunk(ns, cid, blob, "p")
    with pytest.raises(DataCorrupted):
        Sealer(b"w" * 32).open_chunk("job:a", ids[0], blobs[0], "p")
    m = s.seal_manifest("j/0000000001", b"manifest bytes")
    assert m.startswith(MANIFEST_MAGIC) and b"manifest" not in m
    assert open_manifest(s, "j/0000000001", m) == b"manifest bytes"
    assert open_manifest(None, "x", b"plain") == b"plain"
    for sealer, name in ((None, "j/0000000001"), (s, "j/0000000002")):
        with pytest.raises(DataCorrupted):
            open_manifest(sealer, name, m)
    # Keys: file (raw or hex), environment, or none; bad ones are clear errors.
    monkeypatch.delenv("CPCOORD_STORE_KEY", raising=False)
    assert load_key(None) is None
    (tmp_path / "raw").write_bytes(b"r" * 32)
    (tmp_path / "hex").write_text("ab" * 32 + "\n")
    assert load_key(tmp_path / "raw") == Sealer(b"r" * 32)
    assert load_key(tmp_path / "hex") == Sealer(b"\xab" * 32)
    monkeypatch.setenv("CPCOORD_STORE_KEY", "cd" * 32)
    assert load_key(None) == Sealer(b"\xcd" * 32)
    (tmp_path / "short").write_text("abcd")
    for bad in (tmp_path / "short", tmp_path / "missing"):
        with pytest.raises(InvalidArgument):
            load_key(bad)
    monkeypatch.setenv("CPCOORD_STORE_KEY", "zz")
    with pytest.raises(InvalidArgument):
        load_key(None)
    assert "r" * 32 not in repr(Sealer(b"r" * 32))  # keys stay out of reprs and logs
