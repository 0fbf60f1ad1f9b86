"""Names of pack objects: the coordinator's and the ones agents put themselves.

A pack's object name ends in its id (64 hex digits, the BLAKE3-256 of its bytes). The
coordinator's packs are named by the id alone; a pack an agent put on the direct data
path lives under its node's prefix, `nodes/NODE/ID`, and nowhere else: the coordinator
accepts a node's report only for names under that node's prefix, so the name says who
wrote a pack, also after a restart (the trust rule of docs/security.md).
"""

from __future__ import annotations

from cpcoord.errors import InvalidArgument
from cpcoord.ranges import check_name

NODES = "nodes"


def node_prefix(node: str) -> str:
    """`nodes/NODE/`: where an agent puts its packs."""
    check_name(node)
    return f"{NODES}/{node}/"


def node_of(name: str) -> str | None:
    """The node that wrote a pack, from its object name; None for the coordinator's."""
    if not name.startswith(NODES + "/"):
        return None
    parts = name.split("/")
    return parts[1] if len(parts) == 3 else None


def pack_hex(name: str) -> str:
    """The pack id (hex) a pack object name ends in."""
    return name.rsplit("/", 1)[-1]


def pack_id(name: str) -> bytes:
    """The pack id a name ends in; InvalidArgument when it is not 64 hex digits."""
    h = pack_hex(name)
    try:
        raw = bytes.fromhex(h)
    except ValueError:
        raise InvalidArgument(f"pack name {name!r} does not end in a pack id") from None
    if len(raw) != 32 or (name != h and node_of(name) is None):
        raise InvalidArgument(f"pack name {name!r} does not end in a pack id")
    return raw
