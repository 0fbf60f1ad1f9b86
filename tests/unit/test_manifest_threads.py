"""Registers in manifests: a whole-memory member's threads round-trip, a
manifest written before them still loads, bad ones are refused, and a sealed manifest
(encryption at rest) holds no register byte in plaintext."""

from __future__ import annotations

import os
import struct
from dataclasses import replace

import pytest

from coordinator.agent_events import threads_of
from coordinator.store import manifest_io
from coordinator.store.manifest import Manifest, MemberMap, PageTable, RegionMap, ThreadRegs
from cpcoord.errors import DataCorrupted, InvalidArgument, ManifestInvalid
from cpcoord.gen.v1 import common_pb2
from cpcoord.gen.v1 import manifest_pb2 as pb
from storecore.crypt import Sealer, open_manifest
from storecore.ids import digest

PS = 4096
SECRET = bytes.fromhex("23e1fec0e7122e5e")  # a register value that must never leak

# Written by a manifest writer from before thread frames existed (no thread frames, no
# thread_count): job old-job, generation 3 (parent 2), member rank-0, region heap of
# 8 pages at 0x10000 with pages 0-1 from chunk 07..07 (skip 1) and page 3 zero.
OLD = bytes.fromhex(
    "43504d414e494601290000000a27080112076f6c642d6a6f6218032002288080a8b1e39fe7cb1730"
    "80203a076f6c642d6a6f6240010c000000120a0a0672616e6b2d301001120000001a100a04686561"
    "70108080041880800620026a00000022680a10000000000000000003000000000000001208020000"
    "00010000001a08010000000000000022400707070707070707070707070707070707070707070707"
    "07070707070707070700000000000000000000000000000000000000000000000000000000000000"
    "00080000002a0608041002180312f4a897700ebe59aa54dd240fd1a37cedd1df7e83b76cadff6f86"
    "de0ad1f7cb"
)


def thread(tid: int) -> ThreadRegs:
    regs = os.urandom(96) + SECRET + os.urandom(112)  # user_regs_struct is 216 bytes
    return ThreadRegs(tid, "x86_64", regs, os.urandom(2696), start_time=1000 + tid)


def manifest(threads: tuple[ThreadRegs, ...]) -> Manifest:
    t = PageTable.of([0, 5], [3, 2], [os.urandom(32), bytes(32)])
    region = RegionMap("heap", 1 << 32, (1 << 32) + 16 * PS, t)
    return Manifest(
        job="j",
        generation=2,
        parent=1,
        time_ns=123,
        page_size=PS,
        members=(
            MemberMap("whole", (region,), threads),
            MemberMap("explicit", (replace(region, name="range-1"),)),
        ),
    )


def test_registers_round_trip() -> None:
    m = manifest((thread(100), thread(101), thread(4242)))
    back = manifest_io.decode(manifest_io.encode(m))
    assert back == m
    assert [(t.tid, t.start_time) for t in back.member("whole").threads] == [
        (100, 1100),
        (101, 1101),
        (4242, 5242),
    ]
    assert back.member("whole").threads[2].regs == m.member("whole").threads[2].regs
    assert back.member("explicit").threads == ()
    assert SECRET in manifest_io.encode(m)  # stored as they are in a plaintext store


def test_a_manifest_without_registers_still_loads() -> None:
    old = manifest_io.decode(OLD, "old")
    assert old.job == "old-job" and old.generation == 3 and old.parent == 2
    (mm,) = old.members
    assert mm.name == "rank-0" and mm.threads == ()
    assert mm.regions[0].pages.page_count == 3
    # Without threads the writer produces exactly the old bytes.
    assert manifest_io.encode(old) == OLD


def test_bad_registers_are_refused() -> None:
    with pytest.raises(ManifestInvalid, match="thread ids"):
        manifest_io.encode(manifest((thread(7), thread(7))))
    with pytest.raises(ManifestInvalid, match="thread id"):
        manifest_io.encode(manifest((replace(thread(1), tid=0),)))
    with pytest.raises(ManifestInvalid, match="register sets"):
        manifest_io.encode(manifest((replace(thread(1), regs=b""),)))
    # A thread frame missing (the member frame says 2; checksum and trailer made right):
    # corrupt, never a shorter list of threads.
    frames = split(manifest_io.encode(manifest((thread(1), thread(2)))))
    kinds = [f.WhichOneof("kind") for f in frames]
    del frames[kinds.index("thread") + 1]
    frames[-1].trailer.frame_count -= 1
    with pytest.raises(DataCorrupted, match="expected a thread frame"):
        manifest_io.decode(join(frames))


def split(data: bytes) -> list[pb.ManifestFrame]:
    out, pos = [], len(manifest_io.MAGIC)
    while pos < len(data) - 32:
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(pb.ManifestFrame.FromString(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


def join(frames: list[pb.ManifestFrame]) -> bytes:
    body = manifest_io.MAGIC + b"".join(
        struct.pack("<I", len(b)) + b for b in (f.SerializeToString() for f in frames)
    )
    return body + digest(body)


def test_sealed_manifest_holds_no_register_in_plaintext() -> None:
    m = manifest((thread(1), thread(2)))
    sealer = Sealer(os.urandom(32))
    sealed = sealer.seal_manifest("j/2", manifest_io.encode(m))
    assert SECRET not in sealed
    assert manifest_io.decode(open_manifest(sealer, "j/2", sealed)) == m
    with pytest.raises(DataCorrupted):
        open_manifest(None, "j/2", sealed)


def test_staged_registers_become_manifest_threads() -> None:
    msgs = [
        common_pb2.ThreadRegisters(tid=9, arch="x86_64", regs=b"r" * 216, fpregs=b"f" * 512),
        common_pb2.ThreadRegisters(tid=3, arch="x86_64", regs=b"s" * 216, fpregs=b"g" * 512),
    ]
    got = threads_of(msgs, [900, 300])
    assert [(t.tid, t.start_time) for t in got] == [(3, 300), (9, 900)]
    assert got[0].regs == b"s" * 216
    assert [t.start_time for t in threads_of(msgs)] == [0, 0]  # from an older agent
    with pytest.raises(InvalidArgument, match="start times"):
        threads_of(msgs, [1])
    with pytest.raises(InvalidArgument, match="twice"):
        threads_of([msgs[0], msgs[0]])
    with pytest.raises(InvalidArgument, match="thread id"):
        threads_of([common_pb2.ThreadRegisters(tid=-1, arch="x86_64", regs=b"r")])
