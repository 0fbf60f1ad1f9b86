"""Nobody poisons what they do not own: a hostile agent holding node-x's valid
certificate (a real gRPC client over mTLS, tests/helpers/fake_agent.py's protocol) puts
packs into the store itself and reports them, lying: chunks whose bytes do not match
their ids, or packs under another node's prefix, or uploads in another node's name.
Its generation aborts with bad_data (or the call is refused), and node-b's generations
stay exact: node-b never deduplicates onto node-x's bytes unless the coordinator has read
them back and checked them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from coordinator.auth import Security
from coordinator.engine import Engine, Options
from coordinator.server import Deps, create_server
from coordinator.store import Repository, nodepacks
from cpcoord.gen.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2_grpc, types_pb2
from cpcoord.gen.v1 import coordinator_pb2 as C
from cpcoord.grpcopts import channel_options
from cpcoord.tls import TlsFiles, channel_credentials, init_dev_pki
from storecore.backend import Kind
from storecore.ids import as_id_array
from storecore.location import open_backend
from storecore.names import node_prefix
from storecore.packs import PackWriter
from testbed.agent_pages import (
    PAGE,
    changed_pages,
    chunk_ids,
    page_entries,
    pages_header,
    region,
)
from testbed.daemons import wait_for
from tests.helpers.fake_agent import FakeAgent, Held

pytestmark = [pytest.mark.integration]


def _files(pki: Path, stem: str) -> TlsFiles:
    return TlsFiles(pki / f"{stem}.pem", pki / f"{stem}.key", pki / "ca.pem")


def _channel(address: str, files: TlsFiles) -> grpc.Channel:
    return grpc.secure_channel(address, channel_credentials(files), options=channel_options())


class DirectAgent(FakeAgent):
    """A FakeAgent on the direct data path: it puts one pack per upload under a node's
    prefix and reports it. Faults: "lie" (random bytes under the true ids),
    "foreign_prefix" (the pack goes under node-b's prefix), "as_node_b" (the upload
    says it is node-b's)."""

    def __init__(self, address: str, node: str, files: TlsFiles) -> None:
        super().__init__(address, node, connect=False)
        self._channel.close()
        self._channel = _channel(address, files)
        self.stub = agent_pb2_grpc.AgentControlStub(self._channel)
        self.connect()

    def upload(
        self, job: str, gen: int, h: Held, copy: dict[str, bytes], full: bool
    ) -> agent_pb2.UploadResponse:
        w = self.wait_welcome()
        regions, batches, send_ids, blobs = [], [], [], []
        for ri, (rname, r) in enumerate(zip(copy, self.region_list(h.name), strict=True)):
            data = np.frombuffer(copy[rname], dtype=np.uint8).reshape(-1, PAGE)
            committed = None if full else h.committed.get(rname)
            changed = changed_pages(data, committed)
            regions.append(region(rname, r.start, data.shape[0], changed))
            if not changed.size:
                continue
            ids, zero = chunk_ids(data, changed)
            nz = [
                (i, p) for i, (p, z) in enumerate(zip(changed.tolist(), zero, strict=True)) if not z
            ]
            miss = self.stub.MissingChunks(
                agent_pb2.MissingChunksRequest(
                    job=job, generation=gen, member=h.name, ids=b"".join(ids[i] for i, _ in nz)
                )
            ).missing
            bits = np.unpackbits(np.frombuffer(miss, np.uint8), bitorder="little")[: len(nz)]
            for (i, p), b in zip(nz, bits, strict=True):
                if b:
                    send_ids.append(ids[i])
                    blobs.append(os.urandom(PAGE) if "lie" in self.faults else data[p].tobytes())
            batches.append(common_pb2.PageBatch(region=ri, entries=page_entries(changed, ids)))
        report = agent_pb2.StoredPacks()
        if blobs:
            pw = PackWriter(f"job:{job}")
            n = len(blobs)
            pw.add(as_id_array(send_ids), np.zeros(n, np.uint8), blobs, np.full(n, PAGE, np.uint32))
            sp = pw.seal()
            owner = "node-b" if "foreign_prefix" in self.faults else self.node
            name = node_prefix(owner) + sp.id.format()
            backend = open_backend(w.store_location, create=False)
            try:
                backend.put(Kind.PACKS, name, sp.data)
            finally:
                backend.close()
            report.packs.add(name=name, size=len(sp.data), ids=b"".join(send_ids))
        node = "node-b" if "as_node_b" in self.faults else self.node
        header = pages_header(job, gen, h.name, node, regions, full)
        reqs = [agent_pb2.UploadRequest(header=header)]
        reqs += [agent_pb2.UploadRequest(batch=b) for b in batches]
        reqs.append(agent_pb2.UploadRequest(packs=report))
        reqs.append(agent_pb2.UploadRequest(end=agent_pb2.UploadEnd()))
        return self.stub.UploadPages(iter(reqs))


class World:
    def __init__(self, tmp: Path) -> None:
        pki = tmp / "pki"
        init_dev_pki(pki, agents=["node-x", "node-b"])
        self.repo = Repository.open_local(tmp / "store")
        tls = _files(pki, "coordinator")
        opts = Options(heartbeat_s=0.5, send_store_key=True)
        self.engine = Engine(self.repo, opts)
        deps = Deps(self.engine, security=Security(tls=tls))
        self.server, port = create_server("127.0.0.1:0", deps)
        self.engine.start()
        self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.admin = _channel(self.address, _files(pki, "admin"))
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.admin)
        self.x = DirectAgent(self.address, "node-x", _files(pki, "agent-node-x"))
        self.b = FakeAgent(self.address, "node-b", connect=False)
        self.b._channel.close()
        self.b._channel = _channel(self.address, _files(pki, "agent-node-b"))
        self.b.stub = agent_pb2_grpc.AgentControlStub(self.b._channel)
        self.b.connect()
        for a in (self.x, self.b):
            a.wait_welcome()
        wait_for(lambda: len([s for s in self.engine.agents.connected() if s.ready]) == 2)
        # The same pages on both nodes: node-b's dedup candidates are node-x's chunks.
        same = np.random.default_rng(5).integers(0, 256, 32 * PAGE, np.uint8).tobytes()
        self.x.hold("j", "mx", {"r0": bytearray(same)}, start=0x10000000)
        self.b.hold("j", "mb", {"r0": bytearray(same)}, start=0x20000000)
        for m, node in (("mx", "node-x"), ("mb", "node-b")):
            self.stub.AttachMember(
                C.AttachMemberRequest(
                    job="j", member=m, node=node, process=types_pb2.ProcessIdentity(pid=7)
                )
            )

    def checkpoint(self) -> Any:
        return list(self.stub.Checkpoint(C.CheckpointRequest(job="j")))[-1]

    def exact(self, n: int, member: str, agent: FakeAgent) -> bool:
        got = self.repo.read_region("j", n, member, "r0")
        return bytes(got) == bytes(agent.memory(member)["r0"])

    def close(self) -> None:
        self.x.close()
        self.b.close()
        self.admin.close()
        self.engine.close()
        self.server.stop(grace=1).wait()
        self.repo.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


def test_welcome_announces_the_store_and_sends_its_key_over_mtls(world: World) -> None:
    w = world.x.wait_welcome()
    assert w.store_location == os.path.realpath(world.repo.backend.location)
    assert w.store_id == world.repo.identity["id"] and w.store_dedup == "job"


@pytest.mark.parametrize("fault", ["lie", "foreign_prefix"])
def test_a_lying_agent_aborts_its_generation_with_bad_data(world: World, fault: str) -> None:
    world.x.faults.add(fault)
    end = world.checkpoint()
    assert end.kind == common_pb2.PROGRESS_KIND_ABORTED, end
    assert end.reason == common_pb2.ABORT_REASON_BAD_DATA, end
    world.x.faults.discard(fault)
    end = world.checkpoint()
    assert end.kind == common_pb2.PROGRESS_KIND_COMMITTED, end
    assert world.exact(end.generation, "mb", world.b) and world.exact(end.generation, "mx", world.x)


def test_an_agent_cannot_upload_in_another_nodes_name(world: World) -> None:
    world.x.faults.add("as_node_b")
    world.x.events.clear()
    end = world.checkpoint()
    assert end.kind == common_pb2.PROGRESS_KIND_ABORTED, end
    errs = [e for k, e in world.x.events if k == "upload_error"]
    assert errs and errs[0].code() == grpc.StatusCode.PERMISSION_DENIED, errs


def test_a_lie_that_passes_the_sample_is_caught_when_another_node_wants_the_chunk(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No sampling at report (a liar lucky with the sample): node-x's pack is indexed;
    node-b, holding the same pages, asks after it, the coordinator reads node-x's chunks
    back, finds them wrong, drops them and aborts the generation with bad_data (node-x's
    fault); node-b uploads its own bytes next time and every export is exact."""
    monkeypatch.setattr(nodepacks, "SAMPLE", 0)
    world.x.faults.add("lie")
    real_capture = world.b._capture

    def after_x(c: agent_pb2.Capture) -> None:  # node-b uploads once node-x's pack is in
        wait_for(lambda: any(g.packs for g in world.repo.inflight.all()), 30, "node-x's pack")
        real_capture(c)

    world.b._capture = after_x  # type: ignore[method-assign]
    end = world.checkpoint()
    assert end.kind == common_pb2.PROGRESS_KIND_ABORTED, end
    assert end.reason == common_pb2.ABORT_REASON_BAD_DATA, end
    assert "node node-x" in end.detail, end
    assert world.repo.trust.failed > 0
    world.x.faults.discard("lie")
    world.b._capture = real_capture  # type: ignore[method-assign]
    end = world.checkpoint()
    assert end.kind == common_pb2.PROGRESS_KIND_COMMITTED, end
    assert world.exact(end.generation, "mb", world.b) and world.exact(end.generation, "mx", world.x)
