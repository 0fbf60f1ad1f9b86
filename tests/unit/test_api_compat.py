"""The scheduler contract stays backward compatible (docs/api.md, buf-style rules): every
field, enum value and RPC of the client API (coordinator.proto, and the common.proto and
types.proto messages it uses) recorded in `api_v1.lock.json` must still exist with the
same number, type, label and shape. Additions pass without touching the lock; a removal,
renumbering, retyping or renaming fails here.

After adding to the API: `python -m tests.unit.test_api_compat --write` records it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf import descriptor

from cpcoord.gen.v1 import common_pb2, coordinator_pb2, types_pb2

LOCK = Path(__file__).with_name("api_v1.lock.json")
FILES = (coordinator_pb2, common_pb2, types_pb2)


def _message(m: descriptor.Descriptor) -> dict[str, Any]:
    return {
        f.name: [
            f.number,
            f.type,
            f.is_repeated,
            f.message_type.full_name if f.message_type else "",
            f.enum_type.full_name if f.enum_type else "",
            f.containing_oneof.name if f.containing_oneof else "",
        ]
        for f in m.fields
    }


def surface() -> dict[str, Any]:
    """What the client API promises, by full name."""
    messages: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    services: dict[str, Any] = {}
    for mod in FILES:
        fd = mod.DESCRIPTOR
        for m in fd.message_types_by_name.values():
            messages[m.full_name] = _message(m)
        for e in fd.enum_types_by_name.values():
            enums[e.full_name] = {v.name: v.number for v in e.values}
        for s in fd.services_by_name.values():
            services[s.full_name] = {
                r.name: [
                    r.input_type.full_name,
                    r.output_type.full_name,
                    r.client_streaming,
                    r.server_streaming,
                ]
                for r in s.methods
            }
    return {
        "package": coordinator_pb2.DESCRIPTOR.package,
        "messages": messages,
        "enums": enums,
        "services": services,
    }


def broken(locked: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    if locked["package"] != now["package"]:
        out.append(f"package {locked['package']} became {now['package']}")
    for kind in ("messages", "enums", "services"):
        for name, entries in locked[kind].items():
            cur = now[kind].get(name)
            if cur is None:
                out.append(f"{kind[:-1]} {name} removed or renamed")
                continue
            for item, shape in entries.items():
                if item not in cur:
                    out.append(f"{name}.{item} removed or renamed")
                elif cur[item] != shape:
                    out.append(f"{name}.{item} changed: {shape} -> {cur[item]}")
    # A new field must not take a number an old one had under another name.
    for name, fields in locked["messages"].items():
        old = {v[0]: k for k, v in fields.items()}
        for item, shape in now["messages"].get(name, {}).items():
            if shape[0] in old and old[shape[0]] != item:
                out.append(f"{name}.{item} reuses number {shape[0]} of {old[shape[0]]}")
    return out


def test_the_locked_api_is_intact() -> None:
    locked = json.loads(LOCK.read_text())
    assert not broken(locked, surface())


def test_the_check_catches_breaking_changes() -> None:
    locked = json.loads(LOCK.read_text())
    now = json.loads(json.dumps(surface()))
    ev = now["messages"]["cpcoord.v1.CheckpointEvent"]
    ev["generation"][0] = 99  # renumbered
    ev["freshly_named"] = ev.pop("detail")  # renamed
    del now["enums"]["cpcoord.v1.AbortReason"]["ABORT_REASON_CANCELLED"]
    now["services"]["cpcoord.v1.Coordinator"]["Checkpoint"][3] = False  # unary now
    errs = broken(locked, now)
    assert any("CheckpointEvent.generation changed" in e for e in errs)
    assert any("CheckpointEvent.detail removed" in e for e in errs)
    assert any("reuses number 10 of detail" in e for e in errs)
    assert any("ABORT_REASON_CANCELLED removed" in e for e in errs)
    assert any("Coordinator.Checkpoint changed" in e for e in errs)


if __name__ == "__main__" and "--write" in sys.argv:
    LOCK.write_text(json.dumps(surface(), indent=1, sort_keys=True) + "\n")
