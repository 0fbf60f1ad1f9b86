"""Pre-encoded upload batches (nodeagent.upload.chunks.encode_batch) parse exactly as the
UploadRequest message they stand for, raw and compressed, small and large."""

from __future__ import annotations

import numpy as np
import pytest

from cpcoord.gen.v1 import agent_pb2, common_pb2
from nodeagent.upload.chunks import chunk_data, chunk_parts, encode_batch
from nodeagent.upload.stream import _accepts_frames, _serialize, enable_frames


def _chunks(n: int, pages: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, (n * pages, 4096), dtype=np.uint8)
    rows[: pages // 2] = 7  # one compressible chunk
    return [rows[i * pages : (i + 1) * pages] for i in range(n)]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(("n", "pages"), [(1, 1), (3, 16), (70, 16)])
def test_encoded_batch_equals_message(compress: bool, n: int, pages: int) -> None:
    chunks = _chunks(n, pages, n)
    ids = bytes(range(32)) * n
    batch = common_pb2.PageBatch(region=3)
    batch.entries.page_offsets = np.arange(n, dtype="<u8").tobytes()
    batch.entries.chunk_ids = ids
    head, parts, nbytes = chunk_parts(chunks, ids, compress)
    wire = encode_batch(batch, head, parts)

    want = agent_pb2.UploadRequest()
    want.batch.CopyFrom(batch)
    _, n2 = chunk_data(chunks, ids, compress, want.batch.chunks)
    got = agent_pb2.UploadRequest.FromString(wire)
    assert got == want
    assert nbytes == n2 == len(got.batch.chunks.data)
    assert got.batch.chunks.data[: chunks[0].nbytes] == bytes(chunks[0]) or compress


def test_frames_only_on_enabled_stubs() -> None:
    class Fake:
        def UploadPages(self) -> None: ...  # the stub method's name

    assert not _accepts_frames(Fake())
    assert _serialize(b"abc") == b"abc"
    req = agent_pb2.UploadRequest()
    req.batch.region = 1
    assert _serialize(req) == req.SerializeToString()


def test_generated_stub_sends_frames() -> None:
    import grpc

    from cpcoord.gen.v1 import agent_pb2_grpc

    with grpc.insecure_channel("127.0.0.1:9") as ch:
        stub = agent_pb2_grpc.AgentControlStub(ch)
        assert not _accepts_frames(stub)  # the generated serializer refuses bytes
        assert _accepts_frames(enable_frames(stub, ch))
