"""The kernel side of a whole-memory member at a capture's cut, for its Staged.

Read while the member is frozen, right after its registers (nodeagent/proc/kstate.py);
the coordinator keeps it in the manifest and a restore in place compares it with the
kernel side then (nodeagent/restore/kernel_check.py). It never fails a capture: a record
that cannot be read, or is too large for the control stream, is left out with a warning
(that generation then restores without the comparison, as an older one does).
"""

from __future__ import annotations

import logging
import time

from cpcoord import kstate
from cpcoord.errors import CpcoordError
from cpcoord.gen.v1 import manifest_pb2
from nodeagent.daemon.membership import HeldMember
from nodeagent.proc.kstate import read_kernel_state

log = logging.getLogger(__name__)
# Bytes of kernel state per Staged at most (with the registers' 4 MiB, under the 8 MiB
# Welcome.max_message_bytes).
MAX_STAGED_BYTES = 2 << 20


def cut_kernel(m: HeldMember, pid: int) -> manifest_pb2.KernelState | None:
    """The frozen member's fd table and queues, or None (explicit regions, or unread)."""
    if m.regions is not None:
        return None
    t0 = time.perf_counter()
    try:
        rec = kstate.to_proto(read_kernel_state(pid))
    except (CpcoordError, OSError, ValueError) as e:
        log.warning(
            "kernel side not recorded", extra={"fields": {"member": m.name, "error": str(e)}}
        )
        return None
    size = rec.ByteSize()
    fields = {
        "member": m.name,
        "fds": len(rec.fds),
        "bytes": size,
        "ms": round((time.perf_counter() - t0) * 1e3, 3),
    }
    if size > MAX_STAGED_BYTES:
        log.warning("kernel side too large to send: not kept", extra={"fields": fields})
        return None
    log.debug("kernel side recorded", extra={"fields": fields})
    return rec
