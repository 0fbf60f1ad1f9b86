"""Restore, coordinator side, against the real server (in process) and scripted agents
speaking the real AgentControl protocol: the restore generation's order (freeze all,
fit check, Restore, DownloadPages, Restored, Thaw all), a mismatch refusing with nothing
written anywhere and the member and region named, the pages DownloadPages streams (every
page of the complete manifest, zero pages included), and RestoreInto.

The agent here keeps its members' memory as bytes (tests/helpers/fake_agent.py) and
writes what it downloads into them, as the real agent must do with nodeagent/restore/apply.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from cpcoord.gen.v1 import agent_pb2, common_pb2
from testbed.cluster import InProcessCoordinator
from testbed.daemons import wait_for
from tests.helpers.fake_agent import PAGE, FakeAgent, connected_agents
from tests.helpers.inproc_cli import cli, cli_json, rand, setup_job

pytestmark = pytest.mark.integration

ZERO_ID = bytes(32)


def download(agent: FakeAgent, job: str, gen: int, member: str) -> dict[str, bytes]:
    """A member's regions as DownloadPages gives them; a page not listed stays 0xEE, so
    a missing page (instead of a zero marker) shows."""
    stream = agent.stub.DownloadPages(
        agent_pb2.DownloadRequest(job=job, generation=gen, member=member)
    )
    header: Any = None
    chunks: dict[bytes, bytes] = {}
    out: dict[str, bytearray] = {}
    for msg in stream:
        if msg.HasField("header"):
            header = msg.header
            for r in header.regions:
                out[r.name] = bytearray(b"\xee" * (r.end - r.start))
            continue
        b = msg.batch
        c = b.chunks
        ids = [c.ids[i : i + 32] for i in range(0, len(c.ids), 32)]
        sizes = np.frombuffer(c.raw_sizes, "<u4").tolist()
        at = 0
        for cid, n in zip(ids, sizes, strict=True):
            chunks[cid] = c.data[at : at + n]
            at += n
        e = b.entries
        offs = np.frombuffer(e.page_offsets, "<u8").tolist()
        counts = np.frombuffer(e.page_counts, "<u4").tolist()
        skips = np.frombuffer(e.chunk_skips, "<u4").tolist()
        eids = [e.chunk_ids[i : i + 32] for i in range(0, len(e.chunk_ids), 32)]
        buf = out[header.regions[b.region].name]
        for o, n, s, cid in zip(offs, counts, skips, eids, strict=True):
            data = bytes(n * PAGE) if cid == ZERO_ID else chunks[cid][s * PAGE : (s + n) * PAGE]
            buf[o * PAGE : (o + n) * PAGE] = data
    return {k: bytes(v) for k, v in out.items()}


class _Tap:
    """The control stream as FakeAgent's reader sees it, minus the restore commands,
    which the RestoringAgent answers itself."""

    def __init__(self, call: Any, agent: RestoringAgent) -> None:
        self.call, self.agent = call, agent

    def __iter__(self) -> Iterator[Any]:
        for msg in self.call:
            if not self.agent.take(msg):
                yield msg

    def cancel(self) -> None:
        self.call.cancel()


class RestoringAgent(FakeAgent):
    """FakeAgent plus Restore, Thaw and RestoreInto. `misfit[member] = region` makes
    that member not fit (as if the region were unmapped since)."""

    def __init__(self, address: str, node: str) -> None:
        self.misfit: dict[str, str] = {}
        self.frozen: set[str] = set()
        self.log: list[tuple[str, str]] = []  # (what, member or "") in order
        self.processes: dict[int, dict[str, bytearray]] = {}  # RestoreInto targets
        super().__init__(address, node)

    def connect(self) -> None:
        # FakeAgent.connect, with the tap in place before the reader starts.
        self._out.put(self._hello())
        self._call = _Tap(self.stub.Attach(self._outgoing()), self)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._beat, daemon=True).start()

    def take(self, msg: Any) -> bool:
        kind = msg.WhichOneof("body")
        body = getattr(msg, kind)
        if kind == "prepare":  # nothing to prefetch: this agent downloads at Restore
            self.events.append((kind, body))
            self.log.append(("prepared", ""))
            ready = agent_pb2.Prepared(
                job=body.job, generation=body.generation, members=[m.member for m in body.members]
            )
            self.send(prepared=ready)
        elif kind == "freeze" and body.kind == common_pb2.OPERATION_KIND_RESTORE:
            self.events.append((kind, body))
            self._freeze(body)
        elif kind in ("restore", "thaw", "abort"):
            self.events.append((kind, body))
            if kind == "restore":
                threading.Thread(target=self._restore, args=(body,), daemon=True).start()
            else:
                self.log.append((kind, ""))
                self.frozen.clear()
            return kind != "abort"  # the base agent also drops staging on Abort
        elif kind == "restore_into":
            self.events.append((kind, body))
            threading.Thread(target=self._into, args=(msg.command_id, body), daemon=True).start()
        else:
            return False
        return True

    def _freeze(self, f: Any) -> None:
        for m in f.members:
            if m in self.misfit:
                self.send(
                    failed=agent_pb2.Failed(
                        job=f.job,
                        generation=f.generation,
                        member=m,
                        reason=common_pb2.ABORT_REASON_MISMATCH,
                        detail=f"region {self.misfit[m]} is no longer mapped",
                    )
                )
                return
        self.frozen.update(f.members)
        self.log += [("frozen", m) for m in f.members]
        self.send(frozen=agent_pb2.Frozen(job=f.job, generation=f.generation))

    def _restore(self, r: Any) -> None:
        for m in r.members:
            assert m in self.frozen, f"{m} written while not frozen"
            pages = download(self, r.job, r.generation, m)
            for name, data in pages.items():
                self.memory(m)[name][:] = data
            self.log.append(("restored", m))
            n = sum(len(d) for d in pages.values()) // PAGE
            self.send(
                restored=agent_pb2.Restored(
                    job=r.job,
                    generation=r.generation,
                    member=m,
                    stats=common_pb2.MemberStats(pages=n, bytes_logical=n * PAGE),
                )
            )

    def _into(self, cid: int, ri: Any) -> None:
        pages = download(self, ri.job, ri.generation, ri.member)
        self.processes[ri.target.pid] = {k: bytearray(v) for k, v in pages.items()}
        n = sum(len(d) for d in pages.values()) // PAGE
        self.send(
            result=agent_pb2.CommandResult(
                command_id=cid, stats=common_pb2.MemberStats(pages=n, bytes_logical=n * PAGE)
            )
        )


@pytest.fixture
def ragents(inproc: InProcessCoordinator) -> Iterator[dict[str, RestoringAgent]]:
    with connected_agents(inproc, RestoringAgent) as made:
        yield made


def snapshot(agents: dict[str, RestoringAgent]) -> dict[tuple[str, str], bytes]:
    return {
        (m, r): bytes(buf)
        for a in agents.values()
        for m, h in a.members.items()
        for r, buf in h.regions.items()
    }


def test_restore_in_place_writes_every_page_back_then_thaws_all(
    inproc: InProcessCoordinator, ragents: dict[str, RestoringAgent], capsys: Any
) -> None:
    setup_job(inproc, ragents, capsys)  # type: ignore[arg-type]
    a, b = ragents["node-a"], ragents["node-b"]
    r1 = cli_json(inproc, capsys, "checkpoint", "--job", "j")
    at1 = snapshot(ragents)
    # After generation 1: rewrite, zero, and fill pages (r1 of m1 was all zeros).
    a.memory("m1")["r0"][0 : 3 * PAGE] = rand(7, 3)
    a.memory("m1")["r1"][5 * PAGE : 6 * PAGE] = b"\x01" * PAGE
    b.memory("m2")["r0"][10 * PAGE : 14 * PAGE] = bytes(4 * PAGE)
    r2 = cli_json(inproc, capsys, "checkpoint", "--job", "j")
    at2 = snapshot(ragents)
    a.memory("m1")["r0"][20 * PAGE :] = rand(8, 12)  # written after 2, never captured
    assert snapshot(ragents) != at1

    out = cli_json(inproc, capsys, "restore", "--job", "j", "--generation", str(r1["generation"]))
    assert out["state"] == "restored" and out["generation"] == r1["generation"]
    assert sorted(m["member"] for m in out["members"]) == ["m1", "m2"]
    assert out["pages"] == 32 + 16 + 24
    assert snapshot(ragents) == at1, "every byte of every region is back at generation 1"
    # Freeze all before any write; thaw only after every write, on every node.
    for ag in (a, b):
        kinds = [k for k, _ in ag.log]
        assert kinds.index("restored") > max(i for i, k in enumerate(kinds) if k == "frozen")
        assert kinds[-1] == "thaw"
    wait_for(lambda: not inproc.engine.flights, what="the restore flight ends")

    # The newest generation by default; the job can checkpoint again, in full.
    assert cli(inproc, capsys, "restore", "--job", "j")[0] == 0
    assert snapshot(ragents) == at2
    r3 = cli_json(inproc, capsys, "checkpoint", "--job", "j")
    assert r3["state"] == "committed" and r3["full"], r3
    gens = cli_json(inproc, capsys, "generations", "--job", "j")["generations"]
    assert [g["state"] for g in gens] == ["committed"] * 3
    assert r2["generation"] == 2


def test_mismatch_refuses_with_nothing_written_anywhere(
    inproc: InProcessCoordinator, ragents: dict[str, RestoringAgent], capsys: Any
) -> None:
    setup_job(inproc, ragents, capsys)  # type: ignore[arg-type]
    a, b = ragents["node-a"], ragents["node-b"]
    cli_json(inproc, capsys, "checkpoint", "--job", "j")
    a.memory("m1")["r0"][:PAGE] = b"\x05" * PAGE
    b.memory("m2")["r0"][:PAGE] = b"\x06" * PAGE
    before = snapshot(ragents)
    b.misfit["m2"] = "r0"
    code, out = cli(inproc, capsys, "restore", "--job", "j", "--generation", "1", "--json")
    assert code == 59, out
    doc = json.loads(out)
    assert doc["state"] == "aborted" and doc["reason"] == "mismatch"
    assert "m2" in doc["detail"] and "r0" in doc["detail"] and "node-b" in doc["detail"]
    assert doc["members"] == []
    assert snapshot(ragents) == before, "nothing written anywhere"
    assert not a.seen("restore") and not b.seen("restore")
    # The CLI hears the abort first; the Abort reaches node-a on its own stream.
    wait_for(lambda: a.seen("abort"), 10, "the frozen node is told to thaw")
    # The generation is untouched: still committed, and a restore now succeeds.
    b.misfit.clear()
    wait_for(lambda: not inproc.engine.flights, what="the restore flight ends")
    assert cli(inproc, capsys, "restore", "--job", "j", "--generation", "1")[0] == 0
    assert snapshot(ragents) != before


def test_download_pages_streams_every_page_with_zero_markers(
    inproc: InProcessCoordinator, ragents: dict[str, RestoringAgent], capsys: Any
) -> None:
    setup_job(inproc, ragents, capsys)  # type: ignore[arg-type]
    a = ragents["node-a"]
    cli_json(inproc, capsys, "checkpoint", "--job", "j")
    a.memory("m1")["r0"][4 * PAGE : 6 * PAGE] = bytes(2 * PAGE)
    a.memory("m1")["r1"][PAGE : 2 * PAGE] = b"\x09" * PAGE
    cli_json(inproc, capsys, "checkpoint", "--job", "j")  # incremental
    got = download(a, "j", 2, "m1")  # complete, from the parent and the changes
    assert got == {k: bytes(v) for k, v in a.memory("m1").items()}
    # Zero pages come as markers and are written as zeros (the 0xEE fill is gone).
    assert got["r1"] == bytes(PAGE) + b"\x09" * PAGE + bytes(14 * PAGE)
    assert got["r0"][4 * PAGE : 6 * PAGE] == bytes(2 * PAGE)


def test_restore_into_a_new_process(
    inproc: InProcessCoordinator, ragents: dict[str, RestoringAgent], capsys: Any
) -> None:
    setup_job(inproc, ragents, capsys)  # type: ignore[arg-type]
    b = ragents["node-b"]
    cli_json(inproc, capsys, "checkpoint", "--job", "j")
    want = bytes(b.memory("m2")["r0"])
    out = cli_json(inproc, capsys, "restore", "--job", "j", "--member", "m2", "--into", "777")
    assert out["state"] == "restored" and out["into"] == 777 and out["pages"] == 24
    assert bytes(b.processes[777]["r0"]) == want
    (ri,) = b.seen("restore_into")
    assert ri.member == "m2" and ri.generation == 1 and ri.target.pid == 777
    # A region of another size is refused before the agent hears anything.
    code, _ = cli(
        inproc,
        capsys,
        "restore",
        "--job",
        "j",
        "--member",
        "m2",
        "--into",
        "778",
        "--region",
        "r0=0x40000000-0x40001000",
    )
    assert code == 20  # InvalidArgument
    assert len(b.seen("restore_into")) == 1
