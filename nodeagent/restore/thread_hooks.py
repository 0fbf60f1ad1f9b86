"""The capture hook that saves every thread's registers at the cut.

Owns `ThreadStateHooks`: CaptureHooks that save the registers (nodeagent/proc/registers.py)
first in the frozen window, before any other hook injects a system call, then defer to a
tracker's hooks. Kept apart from registers so that process access never imports capture.
"""

from __future__ import annotations

from collections.abc import Sequence

from nodeagent.capture.process import CaptureHooks
from nodeagent.proc.freeze import FrozenProcess
from nodeagent.proc.procfs import Mapping
from nodeagent.proc.registers import ThreadStates, save_thread_state
from nodeagent.trackers.base import ChangedSet


class ThreadStateHooks:
    """CaptureHooks that save every thread's registers at the cut, then defer to `inner`
    (a tracker's hooks, or None). After the capture, `states` holds them."""

    def __init__(self, inner: CaptureHooks | None = None) -> None:
        self.inner = inner
        self.states: ThreadStates | None = None

    def changed(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> ChangedSet | None:
        # First, before any hook injects a system call: these are the cut's registers.
        self.states = save_thread_state(fp)
        return self.inner.changed(fp, maps) if self.inner is not None else None

    def after_copy(self, fp: FrozenProcess, maps: Sequence[Mapping]) -> None:
        if self.inner is not None:
            self.inner.after_copy(fp, maps)
