"""A tracker backend's state, saved by one process and loaded by a later one.

Owns the split of each backend's state into JSON-ready metadata and NumPy arrays, for
`cpcoord capture --parent` (nodeagent/capture/chain.py writes them next to the image):

- uffd-wp: the uffd's number and inode in the target (the fd lives on in the target),
  how it was registered, the untracked mappings. Loading checks that the fd still is that
  userfaultfd (/proc/PID/fd link `anon_inode:[userfaultfd]`, same inode).
- soft-dirty: nothing but the process: the record of writes is in its page tables.
- hash: the digest seed and the digest table (page numbers, 128-bit digests).

`load` returns "" when the tracker can go on, or why it cannot (the capture layer then
takes a full capture and arms again); it never invents a state.
"""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from cpcoord.errors import TrackerFailed
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.trackers.base import Tracker

Meta = dict[str, Any]
Arrays = dict[str, npt.NDArray[Any]]


def save(tracker: Tracker) -> tuple[Meta, Arrays]:
    """The backend's state as (JSON-ready metadata, arrays)."""
    fn = getattr(tracker, "save_state", None)
    if fn is not None:
        meta, arrays = fn()
        return dict(meta), dict(arrays)
    if tracker.name == "soft-dirty":
        # SoftDirtyTracker keeps only the armed process; the chain records that already.
        armed = getattr(tracker, "armed", None)
        return {"armed": armed is not None}, {}
    raise TrackerFailed(tracker.name, 0, "this backend cannot save its state")


def load(tracker: Tracker, ident: ProcessIdentity, meta: Meta, arrays: Arrays) -> str:
    """Give a fresh tracker the saved state for process `ident`; "" or why it cannot."""
    fn = getattr(tracker, "load_state", None)
    try:
        if fn is not None:
            fn(ident, meta, arrays)
            return ""
        if tracker.name == "soft-dirty":
            if not meta.get("armed"):
                return "soft-dirty was not armed"
            # The process is the whole state of this backend.
            tracker.adopt(ident)  # type: ignore[attr-defined]
            return ""
    except TrackerFailed as e:
        return str(e)
    return f"backend {tracker.name} cannot load a saved state"
