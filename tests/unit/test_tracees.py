"""The per-thread registry of held tracees (nodeagent/proc/tracees.py): bookkeeping only; the
real holds (vfork, killed targets) are in tests/integration/test_freeze_hard.py."""

from __future__ import annotations

import os
import threading

from nodeagent.proc import tracees


def test_held_threads_are_per_tracer_thread_and_polled_fast_then_slow() -> None:
    # os.getpid() is never our tracee (nor our child): a poll finds it is not ours.
    me = os.getpid()
    assert tracees.next_poll() is None
    tracees.hold(me, me, signal=10)
    assert tracees.held() == [me]
    h = tracees._reg.held[me]
    assert tracees.next_poll(now=h.since) == tracees.FAST_POLL_S
    later = h.since + tracees.FAST_FOR_S + 1
    assert tracees.next_poll(now=later) == tracees.SLOW_POLL_S
    seen: list[list[int]] = []
    other = threading.Thread(target=lambda: seen.append(tracees.held()))
    other.start()
    other.join()
    assert seen == [[]]  # another thread holds nothing: ptrace is per thread
    got = tracees.adopt(me)
    assert got is not None and got.signal == 10 and tracees.held() == []
    tracees.hold(me, me)
    assert tracees.poll() == 0 and tracees.held() == []  # ECHILD: not ours, dropped
