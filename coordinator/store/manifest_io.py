"""Manifest files: framed protobuf (proto/cpcoord/v1/manifest.proto), written and read.

Grammar of a manifest file (the reader below enforces every rule):

    manifest  = MAGIC frame<header> member{header.member_count} frame<trailer> checksum
    member    = frame<member> frame<thread>{member.thread_count} region{member.region_count}
    region    = frame<region> frame<entries>*     (their entries add up to entry_count)
    frame<K>  = length:u32le  ManifestFrame{kind = K}[length]     (length <= 16 MiB)
    MAGIC     = "CPMANIF" 0x01                                     8 bytes
    checksum  = BLAKE3-256 of every byte before it                 32 bytes, raw

  trailer.frame_count counts the frames before the trailer; trailer.entry_count and
  trailer.page_count repeat the totals; nothing may follow the checksum. An entries frame
  holds at most 65536 entries as packed little-endian columns (see manifest.proto).

The checksum is checked before anything is parsed, so a truncated or bit-flipped file
is refused as DataCorrupted; a file with a good checksum that breaks the grammar or the
model's rules (Manifest.validate) is refused as ManifestInvalid / DataCorrupted.
"""

from __future__ import annotations

import struct

import numpy as np
from google.protobuf.message import DecodeError

from coordinator.store.manifest import (
    FORMAT,
    Manifest,
    MemberMap,
    PageTable,
    RegionMap,
    ThreadRegs,
)
from cpcoord import kstate, mapfacts
from cpcoord.errors import DataCorrupted, InvalidArgument, ManifestInvalid
from cpcoord.gen.v1 import manifest_pb2 as pb
from storecore.ids import ID_DTYPE, digest

MAGIC = b"CPMANIF\x01"
MAX_FRAME = 16 << 20
ENTRIES_PER_FRAME = 1 << 16
_LEN = struct.Struct("<I")


def encode(m: Manifest) -> bytes:
    """Serialise a validated manifest."""
    m.validate()
    parts: list[bytes] = [MAGIC]

    def frame(msg: pb.ManifestFrame) -> None:
        b = msg.SerializeToString()
        parts.append(_LEN.pack(len(b)))
        parts.append(b)

    header = pb.ManifestHeader(
        format=FORMAT,
        job=m.job,
        generation=m.generation,
        time_ns=m.time_ns,
        page_size=m.page_size,
        namespace=m.namespace,
        member_count=len(m.members),
    )
    if m.parent is not None:
        header.parent = m.parent
    frame(pb.ManifestFrame(header=header))
    entries = pages = 0
    for mem in m.members:
        mf = pb.ManifestMember(
            name=mem.name,
            region_count=len(mem.regions),
            thread_count=len(mem.threads),
            layout=mapfacts.to_protos(mem.layout),
        )
        if mem.kernel is not None:
            mf.kernel.CopyFrom(kstate.to_proto(mem.kernel))
        frame(pb.ManifestFrame(member=mf))
        for th_ in mem.threads:
            th = pb.ManifestThread(
                tid=th_.tid,
                arch=th_.arch,
                regs=th_.regs,
                fpregs=th_.fpregs,
                start_time=th_.start_time,
            )
            frame(pb.ManifestFrame(thread=th))
        for r in mem.regions:
            t = r.pages
            frame(
                pb.ManifestFrame(
                    region=pb.ManifestRegion(
                        name=r.name,
                        start=r.start,
                        end=r.end,
                        entry_count=len(t),
                        mappings=mapfacts.to_protos(r.mappings),
                    )
                )
            )
            for lo in range(0, len(t), ENTRIES_PER_FRAME):
                hi = lo + ENTRIES_PER_FRAME
                pe = pb.PageEntries(
                    page_offsets=t.offsets[lo:hi].astype("<u8").tobytes(),
                    page_counts=t.counts[lo:hi].astype("<u4").tobytes(),
                    chunk_skips=t.skips[lo:hi].astype("<u4").tobytes(),
                    chunk_ids=np.ascontiguousarray(t.ids[lo:hi]).tobytes(),
                )
                frame(pb.ManifestFrame(entries=pe))
            entries += len(t)
            pages += t.page_count
    nframes = (len(parts) - 1) // 2
    trailer = pb.ManifestTrailer(frame_count=nframes, entry_count=entries, page_count=pages)
    frame(pb.ManifestFrame(trailer=trailer))
    body = b"".join(parts)
    return body + digest(body)


class _Reader:
    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.where = data, where
        self.pos = len(MAGIC)
        self.end = len(data) - 32
        self.frames = 0

    def corrupt(self, why: str) -> DataCorrupted:
        return DataCorrupted("manifest", self.where, why)

    def next(self, kind: str) -> pb.ManifestFrame:
        if self.pos + _LEN.size > self.end:
            raise self.corrupt(f"ends where a {kind} frame should start")
        (n,) = _LEN.unpack_from(self.data, self.pos)
        start = self.pos + _LEN.size
        if n > MAX_FRAME or start + n > self.end:
            raise self.corrupt(f"frame of {n} bytes at {self.pos} does not fit")
        try:
            f = pb.ManifestFrame.FromString(self.data[start : start + n])
        except DecodeError as e:
            raise self.corrupt(f"frame at {self.pos}: {e}") from None
        got = f.WhichOneof("kind")
        if got != kind:
            raise self.corrupt(f"expected a {kind} frame at {self.pos}, found {got}")
        self.pos = start + n
        self.frames += 1
        return f


def decode(data: bytes, where: str = "?") -> Manifest:
    """Parse and validate a manifest file (grammar at the top of this module)."""
    if len(data) < len(MAGIC) + 32 or not data.startswith(MAGIC):
        raise DataCorrupted("manifest", where, "not a manifest (bad magic or too short)")
    if digest(data[:-32]) != data[-32:]:
        raise DataCorrupted("manifest", where, "checksum mismatch (truncated or damaged)")
    rd = _Reader(data, where)
    h = rd.next("header").header
    if h.format != FORMAT:
        raise rd.corrupt(f"unsupported format {h.format}")
    members = []
    entries = pages = 0
    for _ in range(h.member_count):
        mf = rd.next("member").member
        threads = []
        for _ in range(mf.thread_count):
            th = rd.next("thread").thread
            threads.append(
                ThreadRegs(th.tid, th.arch, bytes(th.regs), bytes(th.fpregs), th.start_time)
            )
        regions = []
        for _ in range(mf.region_count):
            rf = rd.next("region").region
            cols: list[list[bytes]] = [[], [], [], []]
            got = 0
            while got < rf.entry_count:
                pe = rd.next("entries").entries
                n = len(pe.page_counts) // 4
                sizes = (
                    len(pe.page_offsets),
                    len(pe.page_counts),
                    len(pe.chunk_skips),
                    len(pe.chunk_ids),
                )
                if n == 0 or sizes != (8 * n, 4 * n, 4 * n, 32 * n):
                    raise rd.corrupt(f"entries frame with columns of {sizes} bytes")
                for c, b in zip(
                    cols,
                    (pe.page_offsets, pe.page_counts, pe.chunk_skips, pe.chunk_ids),
                    strict=True,
                ):
                    c.append(b)
                got += n
            if got != rf.entry_count:
                raise rd.corrupt(f"region {rf.name}: {got} entries, header says {rf.entry_count}")
            t = PageTable(
                np.frombuffer(b"".join(cols[0]), dtype="<u8").astype(np.uint64),
                np.frombuffer(b"".join(cols[1]), dtype="<u4").astype(np.uint32),
                np.frombuffer(b"".join(cols[2]), dtype="<u4").astype(np.uint32),
                np.frombuffer(b"".join(cols[3]), dtype=ID_DTYPE).copy(),
            )
            facts = mapfacts.from_protos(rf.mappings)
            regions.append(RegionMap(rf.name, rf.start, rf.end, t, facts))
            entries += len(t)
            pages += t.page_count
        try:
            kernel = kstate.of_message(mf)
        except InvalidArgument as e:
            raise rd.corrupt(f"member {mf.name}: {e}") from None
        layout = mapfacts.from_protos(mf.layout)
        if why := mapfacts.check_layout_facts(layout):
            raise rd.corrupt(f"member {mf.name}: layout at the cut: {why}")
        members.append(
            MemberMap(mf.name, tuple(regions), tuple(threads), kernel=kernel, layout=layout)
        )
    frames_before = rd.frames
    tr = rd.next("trailer").trailer
    if (tr.frame_count, tr.entry_count, tr.page_count) != (frames_before, entries, pages):
        raise rd.corrupt("trailer totals do not match the frames")
    if rd.pos != rd.end:
        raise rd.corrupt(f"{rd.end - rd.pos} stray bytes after the trailer")
    m = Manifest(
        job=h.job,
        generation=h.generation,
        parent=h.parent if h.HasField("parent") else None,
        time_ns=h.time_ns,
        page_size=h.page_size,
        members=tuple(members),
        namespace=h.namespace,
    )
    try:
        m.validate()
    except ManifestInvalid as e:
        raise rd.corrupt(str(e)) from None
    return m
