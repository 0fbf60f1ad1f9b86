"""grpcurl-style access to a running coordinator through server reflection only
: list the services, resolve methods and messages from the
descriptors the server sends, and call RPCs with message classes built from them,
without the generated stubs (a fresh descriptor pool, nothing from cpcoord.gen).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from testbed.cluster import Cluster
from testbed.daemons import REPO
from testbed.driver import Target

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Dynamic:
    """What grpcurl does: descriptors from reflection, messages built from them."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.db = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)

    def services(self) -> list[str]:
        return list(self.db.get_services())

    def method(self, full: str) -> Any:
        service, _, name = full.rpartition(".")
        return self.pool.FindServiceByName(service).FindMethodByName(name)

    def message(self, full: str) -> Any:
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full))

    def call(self, full: str, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        m = self.method(full)
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        assert not m.server_streaming and not m.client_streaming
        fn = self.channel.unary_unary(
            f"/{m.containing_service.full_name}/{m.name}",
            request_serializer=lambda r: r.SerializeToString(),
            response_deserializer=resp_cls.FromString,
        )
        req = json_format.ParseDict(body, req_cls())
        return json_format.MessageToDict(fn(req, timeout=timeout))


def test_services_listed_and_called_through_reflection(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target]
) -> None:
    cl = cluster_factory(nodes=("node-a",))
    t = target_factory(maps=["data:16"])
    with grpc.insecure_channel(cl.address) as ch:
        d = Dynamic(ch)
        services = set(d.services())
        assert {
            "cpcoord.v1.Coordinator",
            "cpcoord.v1.AgentControl",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services, services

        coord = d.pool.FindServiceByName("cpcoord.v1.Coordinator")
        methods = {m.name for m in coord.methods}
        assert {"ListJobs", "AttachMember", "Checkpoint", "Watch", "Restore"} <= methods
        # docs/api.md, the scheduler contract, documents every RPC the server offers.
        doc = (REPO / "docs" / "api.md").read_text()
        undocumented = {n for n in methods if f"\n### {n} (" not in doc}
        assert not undocumented, f"docs/api.md lacks {sorted(undocumented)}"
        assert d.method("cpcoord.v1.Coordinator.Checkpoint").server_streaming
        ev = d.pool.FindMessageTypeByName("cpcoord.v1.WatchEvent")
        assert {"kind", "job", "info", "lost", "seq", "gc"} <= set(ev.fields_by_name)
        assert ev.fields_by_name["seq"].number == 13

        # Health, as `grpcurl ... grpc.health.v1.Health/Check` would.
        h = d.call("grpc.health.v1.Health.Check", {"service": "cpcoord.v1.Coordinator"})
        assert h["status"] == "SERVING"

        # Attach a member and list it, with messages built from reflected descriptors.
        m = t.mapping("data")
        got = d.call(
            "cpcoord.v1.Coordinator.AttachMember",
            {
                "job": "refl",
                "member": "m0",
                "node": "node-a",
                "process": {"pid": t.pid},
                "regions": [{"name": "data", "start": str(m.addr), "end": str(m.end)}],
            },
        )
        assert got["member"]["name"] == "m0" and got["member"]["process"]["pid"] == t.pid
        jobs = d.call("cpcoord.v1.Coordinator.ListJobs", {})
        (job,) = jobs["jobs"]
        assert job["name"] == "refl"
        (member,) = job["members"]
        assert member["health"] == "MEMBER_HEALTH_RUNNING" and member["node"] == "node-a"
        assert int(member["regions"][0]["start"]) == m.addr

        # A refused call carries its status and the cpcoord error class as grpcurl shows.
        with pytest.raises(grpc.RpcError) as ei:
            d.call("cpcoord.v1.Coordinator.ListJobs", {"job": "nope"})
        err: Any = ei.value
        assert err.code() is grpc.StatusCode.NOT_FOUND
        assert dict(err.trailing_metadata())["cpcoord-error"] == "UnknownJob"

        # A server stream through reflection: Checkpoint, ending COMMITTED.
        cp = d.method("cpcoord.v1.Coordinator.Checkpoint")
        stream = ch.unary_stream(
            "/cpcoord.v1.Coordinator/Checkpoint",
            request_serializer=lambda r: r.SerializeToString(),
            response_deserializer=message_factory.GetMessageClass(cp.output_type).FromString,
        )
        req = json_format.ParseDict({"job": "refl"}, d.message("cpcoord.v1.CheckpointRequest")())
        kinds = [json_format.MessageToDict(e)["kind"] for e in stream(req, timeout=120)]
        assert kinds[0] == "PROGRESS_KIND_FREEZE_SENT" and kinds[-1] == "PROGRESS_KIND_COMMITTED"
        assert "PROGRESS_KIND_BARRIER" in kinds
    t.assert_running()
