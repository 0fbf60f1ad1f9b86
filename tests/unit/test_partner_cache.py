"""Partner copies, the holder's side (nodeagent/cache/partner.py, nodeagent/daemon/
partner_server.py) through a real gRPC server on loopback: Lacks, Put of whole packs,
each checked in full before it is written and reported; bad packs, foreign names and
(under mTLS) a caller whose certificate names another node are refused."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import numpy as np
import pytest

from cpcoord import grpcopts
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc
from cpcoord.tls import agent_server_name, init_dev_pki, tls_files
from nodeagent.cache.partner import CacheView, PartnerStore
from nodeagent.cache.store import NodeCache
from nodeagent.daemon.partner_send import PartnerSender
from nodeagent.daemon.partner_server import PartnerServer, PartnerServicer
from storecore import compress, packs
from storecore.backend import Kind
from storecore.ids import as_id_array, digest


def _pack(seed: int, n: int = 8) -> packs.SealedPack:
    rng = np.random.default_rng(seed)
    chunks = [rng.bytes(4096) for _ in range(n)]
    ids = as_id_array([digest(c) for c in chunks])
    methods, blobs = compress.compress_batch(chunks, level=1, threads=1)
    w = packs.PackWriter("job:t")
    w.add(ids, methods, blobs, np.array([len(c) for c in chunks]))
    return w.seal()


def _name(sender: str, p: packs.SealedPack) -> str:
    return f"nodes/{sender}/{p.id.format()}"


class _Holder:
    def __init__(self, root: Path, tls: bool = False, pki: Path | None = None) -> None:
        self.reports: list[agent_pb2.Partnered] = []
        self.store = PartnerStore(root)
        files = None
        if tls:
            assert pki is not None
            files = tls_files(pki / "agent-node-b.pem", pki / "agent-node-b.key", pki / "ca.pem")
        servicer = PartnerServicer(self.store, lambda: None, self.reports.append, tls)
        servicer.allowed = frozenset({"node-a"})  # as the coordinator says
        self.servicer = servicer
        self.server = PartnerServer("127.0.0.1:0", servicer, files)
        self.server.start()

    def stub(self, **kw: object) -> agent_pb2_grpc.PartnerCacheStub:
        ch = grpcopts.make_channel(self.server.address, **kw)  # type: ignore[arg-type]
        return agent_pb2_grpc.PartnerCacheStub(ch)

    def close(self) -> None:
        self.server.stop()


def _put(
    stub: agent_pb2_grpc.PartnerCacheStub, sender: str, items: list[tuple[str, bytes]],
    names: list[str] | None = None,
) -> agent_pb2.PartnerPutResponse:  # fmt: skip
    def gen():  # type: ignore[no-untyped-def]
        want = names or [n for n, _ in items]
        yield agent_pb2.PartnerPut(generation=agent_pb2.PartnerGeneration(
            sender=sender, job="j", generation=3, packs=want))  # fmt: skip
        for n, data in items:
            yield agent_pb2.PartnerPut(pack=agent_pb2.PartnerPack(name=n, size=len(data)))
            for lo in range(0, len(data), 5000):
                yield agent_pb2.PartnerPut(data=data[lo : lo + 5000])

    return stub.Put(gen(), timeout=30)


def test_lacks_put_checks_writes_durably_and_reports(tmp_path: Path) -> None:
    h = _Holder(tmp_path / "cache")
    try:
        stub = h.stub()
        a, b = _pack(1), _pack(2)
        na, nb = _name("node-a", a), _name("node-a", b)
        got = stub.Lacks(agent_pb2.LacksRequest(sender="node-a", packs=[na, nb]), timeout=10)
        assert list(got.packs) == [na, nb]
        r = _put(stub, "node-a", [(na, a.data)], names=[na])
        assert list(r.packs) == [na]
        got = stub.Lacks(agent_pb2.LacksRequest(sender="node-a", packs=[na, nb]), timeout=10)
        assert list(got.packs) == [nb]
        on_disk = h.store.backend("node-a").get(Kind.PACKS, na)
        assert on_disk == a.data
        assert [(p.sender, p.job, p.generation, list(p.packs)) for p in h.reports] == [
            ("node-a", "j", 3, [na])
        ]
        # A second Put of the generation, sending only what it lacks, reports all held.
        _put(stub, "node-a", [(nb, b.data)], names=[na, nb])
        assert list(h.reports[-1].packs) == [na, nb]
        # A restart finds the copies again; the cache view reads them by name.
        again = PartnerStore(tmp_path / "cache")
        assert again.has(na) and again.has(nb) and again.held_bytes == len(a.data) + len(b.data)
        own = NodeCache(tmp_path / "cache").backend
        assert CacheView(own, again).get(Kind.PACKS, nb) == b.data
    finally:
        h.close()


def test_packs_of_one_put_each_arrive_whole_whatever_their_sizes_and_order(
    tmp_path: Path,
) -> None:
    """The holder reuses one receive buffer for a call's packs: a smaller pack after a
    bigger one must be checked and written at its own size, not with the bigger one's
    tail, and a damaged pack after good ones is refused while the good ones stay."""
    h = _Holder(tmp_path / "cache")
    try:
        stub = h.stub()
        big, small, mid = _pack(11, n=24), _pack(12, n=3), _pack(13, n=9)
        assert len(big.data) > len(mid.data) > len(small.data)
        items = [(_name("node-a", p), p.data) for p in (big, small, mid)]
        r = _put(stub, "node-a", items)
        assert list(r.packs) == [n for n, _ in items]
        for n, data in items:
            assert h.store.backend("node-a").get(Kind.PACKS, n) == data
        late, bad_one = _pack(14, n=2), _pack(15, n=2)
        damaged = bytearray(bad_one.data)
        damaged[-200] ^= 1
        nl, nbad = _name("node-a", late), _name("node-a", bad_one)
        with pytest.raises(grpc.RpcError) as e:
            _put(stub, "node-a", [(nl, late.data), (nbad, bytes(damaged))])
        assert e.value.code() is grpc.StatusCode.DATA_LOSS, e.value
        assert h.store.backend("node-a").get(Kind.PACKS, nl) == late.data
        assert not h.store.has(nbad)
    finally:
        h.close()


def test_a_bad_pack_or_a_foreign_name_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    h = _Holder(tmp_path / "cache")
    try:
        stub = h.stub()
        a = _pack(3)
        na = _name("node-a", a)
        bad = bytearray(a.data)
        bad[100] ^= 1
        with pytest.raises(grpc.RpcError) as e:
            _put(stub, "node-a", [(na, bytes(bad))])
        assert e.value.code() is grpc.StatusCode.DATA_LOSS, e.value  # DataCorrupted
        with pytest.raises(grpc.RpcError) as e:  # another node's prefix
            _put(stub, "node-a", [(_name("node-c", a), a.data)])
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:  # a sender the coordinator did not name
            _put(stub, "node-c", [(_name("node-c", a), a.data)])
        assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "not a sender" in (e.value.details() or "")
        assert not h.store.has(na) and not h.reports
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    finally:
        h.close()


def test_under_mtls_a_caller_must_be_the_sender(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_dev_pki(pki, agents=["node-a", "node-b", "node-c"])
    h = _Holder(tmp_path / "cache", tls=True, pki=pki)
    try:
        a = _pack(4)
        na = _name("node-a", a)
        as_c = tls_files(pki / "agent-node-c.pem", pki / "agent-node-c.key", pki / "ca.pem")
        stub = h.stub(tls=as_c, server_name=agent_server_name("node-b"))
        with pytest.raises(grpc.RpcError) as e:
            _put(stub, "node-a", [(na, a.data)])
        assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED, e.value
        as_a = tls_files(pki / "agent-node-a.pem", pki / "agent-node-a.key", pki / "ca.pem")
        # The partner's certificate must name the node the coordinator chose.
        wrong = h.stub(tls=as_a, server_name=agent_server_name("node-c"))
        with pytest.raises(grpc.RpcError) as e:
            wrong.Lacks(agent_pb2.LacksRequest(sender="node-a", packs=[na]), timeout=10)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        stub = h.stub(tls=as_a, server_name=agent_server_name("node-b"))
        assert list(_put(stub, "node-a", [(na, a.data)]).packs) == [na]
    finally:
        h.close()


def test_the_sender_sends_what_the_partner_lacks(tmp_path: Path) -> None:
    h = _Holder(tmp_path / "holder")
    cache = NodeCache(tmp_path / "sender")
    try:
        a, b = _pack(5), _pack(6)
        names = [_name("node-a", a), _name("node-a", b)]
        for n, p in zip(names, (a, b), strict=True):
            assert cache.reserve("j", 3, n, len(p.data))
            cache.backend.put(Kind.PACKS, n, p.data)
        s = PartnerSender("node-a", cache, None)
        s.set_partner(agent_pb2.PartnerChanged(node="node-b", address=h.server.address))
        assert s._send(("j", 3), names, ("node-b", h.server.address))
        assert h.store.has(names[0]) and h.store.has(names[1])
        assert s.sent_bytes == len(a.data) + len(b.data)
        assert s._send(("j", 3), names, ("node-b", h.server.address))  # nothing lacks now
        assert s.sent_bytes == len(a.data) + len(b.data)
        assert [list(r.packs) for r in h.reports] == [names, names]
        s.stop()
    finally:
        h.close()
    assert os.path.isdir(tmp_path / "holder" / "partner" / "node-a")


def test_partner_copies_and_the_own_cache_share_one_bound(tmp_path: Path) -> None:
    from cpcoord.errors import PartnerFull

    a, b = _pack(7), _pack(8)
    size = len(a.data) + len(b.data) // 2
    cache = NodeCache(tmp_path / "cache", size=size)
    store = PartnerStore(cache.root, lambda: cache.bytes, cache.size)
    cache.others = lambda: store.held_bytes
    store.put("node-a", _name("node-a", a), a.data, None)
    with pytest.raises(PartnerFull):  # the copies alone would pass the bound
        store.put("node-a", _name("node-a", b), b.data, None)
    assert not store.has(_name("node-a", b))
    # The node's own cache sees the copies' bytes: a pack that would fit alone does not.
    assert not cache.reserve("j", 1, _name("node-z", b), len(b.data))
    assert cache.reserve("j", 1, _name("node-z", b), size - len(a.data))


def test_a_full_partner_is_counted_and_the_generation_given_up_not_retried(
    tmp_path: Path,
) -> None:
    a = _pack(9)
    name = _name("node-a", a)
    h = _Holder(tmp_path / "holder")
    h.store.size = len(a.data) - 1  # nothing fits there
    cache = NodeCache(tmp_path / "sender")
    try:
        assert cache.reserve("j", 3, name, len(a.data))
        cache.backend.put(Kind.PACKS, name, a.data)
        s = PartnerSender("node-a", cache, None)
        assert s._send(("j", 3), [name], ("node-b", h.server.address))  # done with it
        assert s.full == 1 and not h.store.has(name) and not h.reports
        h.close()  # a partner that is down: not done, retried later
        assert not s._send(("j", 3), [name], ("node-b", h.server.address))
        assert s.full == 1
        s.stop()
    finally:
        h.close()
