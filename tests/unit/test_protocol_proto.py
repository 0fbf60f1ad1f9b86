"""The gRPC API and the protocol core agree, and the API stays documented.

The enums of coordinator/protocol/values.py must be the proto enums of common.proto by
name (servicers translate by name); every field and enum value of the API files carries
a comment; the RPCs have the shapes the other parts rely on.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

import pytest
from google.protobuf.descriptor import EnumDescriptor

from coordinator.protocol.values import AbortReason, GenState, Kind, ProgressKind
from cpcoord.gen.v1 import agent_pb2, common_pb2, coordinator_pb2

PROTO = Path(__file__).resolve().parents[2] / "proto" / "cpcoord" / "v1"
API_FILES = ("agent.proto", "common.proto", "coordinator.proto")


@pytest.mark.parametrize(
    ("py", "proto", "prefix"),
    [
        (AbortReason, common_pb2.AbortReason.DESCRIPTOR, "ABORT_REASON_"),
        (GenState, common_pb2.GenerationState.DESCRIPTOR, "GENERATION_STATE_"),
        (ProgressKind, common_pb2.ProgressKind.DESCRIPTOR, "PROGRESS_KIND_"),
        (Kind, common_pb2.OperationKind.DESCRIPTOR, "OPERATION_KIND_"),
    ],
)
def test_python_enums_match_proto_enums(
    py: type[StrEnum], proto: EnumDescriptor, prefix: str
) -> None:
    names = [v.name for v in proto.values]
    assert names[0] == prefix + "UNSPECIFIED" and proto.values[0].number == 0
    assert [n.removeprefix(prefix).lower() for n in names[1:]] == [m.value for m in py]


FIELD = re.compile(r"^\s*(?:optional |repeated )?[\w.]+ \w+ = \d+;")
ENUM_VALUE = re.compile(r"^\s*[A-Z][A-Z0-9_]* = \d+;")


@pytest.mark.parametrize("name", API_FILES)
def test_every_field_is_documented(name: str) -> None:
    lines = (PROTO / name).read_text().splitlines()
    bare = []
    for i, line in enumerate(lines):
        if not (FIELD.match(line) or ENUM_VALUE.match(line)) or "//" in line:
            continue
        if i and lines[i - 1].strip().startswith("//"):
            continue  # documented by the comment block above it
        if line.strip().endswith("_UNSPECIFIED = 0;"):
            continue  # proto3's mandatory zero value says itself what it is
        bare.append(f"{name}:{i + 1}: {line.strip()}")
    assert not bare, "undocumented fields:\n" + "\n".join(bare)


def rpc_shapes(service: str, module: object) -> dict[str, tuple[bool, bool, str, str]]:
    svc = module.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
    return {
        m.name: (
            m.client_streaming,
            m.server_streaming,
            m.input_type.name,
            m.output_type.name,
        )
        for m in svc.methods
    }


def test_agent_service_shapes() -> None:
    assert rpc_shapes("AgentControl", agent_pb2) == {
        "Attach": (True, True, "AgentMessage", "CoordinatorMessage"),
        "MissingChunks": (False, False, "MissingChunksRequest", "MissingChunksResponse"),
        "UploadPages": (True, False, "UploadRequest", "UploadResponse"),
        "DownloadPages": (False, True, "DownloadRequest", "PageData"),
        "SendCached": (True, False, "CachedChunks", "SendCachedResponse"),
    }


def test_coordinator_service_shapes() -> None:
    shapes = rpc_shapes("Coordinator", coordinator_pb2)
    streaming = {n for n, (_, server, _, _) in shapes.items() if server}
    assert streaming == {
        "Checkpoint",
        "Restore",
        "Diff",
        "ReadGeneration",
        "GarbageCollect",
        "Verify",
        "Watch",
    }
    assert not any(client for client, _, _, _ in shapes.values())
    assert shapes["Checkpoint"][2:] == ("CheckpointRequest", "CheckpointEvent")
    assert shapes["ReadGeneration"][3] == "PageData"  # the DownloadPages format
    for rpc in ("ListJobs", "AttachMember", "DetachMember", "ListGenerations"):
        assert shapes[rpc][2:] == (f"{rpc}Request", f"{rpc}Response")
    for rpc in ("GetGeneration", "DeleteGeneration", "PinGeneration", "StoreStats"):
        assert shapes[rpc][2:] == (f"{rpc}Request", f"{rpc}Response")


def test_agent_events_cover_the_protocol_events() -> None:
    """Each event of the core has a wire form (AgentLost is the broken stream itself;
    Begin, Tick, Store*, Cancel come from the coordinator's own side)."""
    body = agent_pb2.AgentMessage.DESCRIPTOR.oneofs_by_name["body"]
    assert {f.name for f in body.fields} >= {
        "hello",
        "frozen",
        "staged",
        "uploaded",
        "restored",
        "failed",
        "member_gone",
        "heartbeat",
    }
    cmds = agent_pb2.CoordinatorMessage.DESCRIPTOR.oneofs_by_name["body"]
    assert {f.name for f in cmds.fields} >= {
        "freeze",
        "capture",
        "abort",
        "committed",
        "restore",
        "thaw",
        "attach_member",
        "detach_member",
    }
