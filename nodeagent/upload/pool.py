"""The upload pool: runs member uploads (nodeagent/upload/stream.py) on a few threads after the
thaw, cancels them by generation (Abort) or all at once (a broken control stream), and
hands each outcome to the agent, which reports Uploaded or Failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cpcoord.errors import CpcoordError, UploadFailed
from nodeagent.upload.stream import Limits, StagedMember, UploadResult, upload

log = logging.getLogger(__name__)

KEEP_FLAGS = 256  # cancel flags of recent generations
Done = Callable[[StagedMember, "UploadResult | CpcoordError | None", int], None]


class Uploader:
    """Runs uploads on a few threads; cancels them by generation or all at once.

    `on_done(staged, result, epoch)` gets an UploadResult, the error, or None when the
    upload was cancelled (an Abort or a broken control stream: nothing to report). The
    member's staging is released when its upload ends, whatever the outcome.
    """

    def __init__(self, on_done: Done, threads: int = 2) -> None:
        self._on_done = on_done
        self._lock = threading.Lock()
        self._cancels: dict[tuple[str, int], threading.Event] = {}
        self._sem = threading.Semaphore(max(1, threads))
        self._threads: set[threading.Thread] = set()

    def _flag(self, job: str, generation: int) -> threading.Event:
        """The generation's cancel flag (lock held). Flags of ended generations are kept
        for a while, so a Capture finishing after its Abort uploads nothing."""
        ev = self._cancels.setdefault((job, generation), threading.Event())
        while len(self._cancels) > KEEP_FLAGS:
            del self._cancels[next(iter(self._cancels))]
        return ev

    def submit(self, stub: Any, sm: StagedMember, limits: Limits, epoch: int) -> None:
        with self._lock:
            cancel = self._flag(sm.job, sm.generation)
            t = threading.Thread(
                target=self._run,
                args=(stub, sm, limits, epoch, cancel),
                daemon=True,
                name=f"cpcoord-upload-{sm.member}",
            )
            self._threads.add(t)
        t.start()

    def _run(
        self, stub: Any, sm: StagedMember, limits: Limits, epoch: int, cancel: threading.Event
    ) -> None:
        result: UploadResult | CpcoordError | None
        try:
            with self._sem:
                result = None if cancel.is_set() else upload(stub, sm, limits, cancel)
        except CpcoordError as e:
            result = None if cancel.is_set() else e
        except Exception as e:  # a bug must still end in a report, never a silent member
            log.exception("upload crashed", extra={"fields": {"member": sm.member}})
            result = (
                None if cancel.is_set() else UploadFailed(sm.member, sm.job, sm.generation, repr(e))
            )
        finally:
            sm.release()
            with self._lock:
                self._threads.discard(threading.current_thread())
        self._on_done(sm, result, epoch)

    def cancel(self, job: str, generation: int) -> None:
        with self._lock:
            self._flag(job, generation).set()

    def cancel_all(self) -> None:
        """The stream broke: every upload in flight is for it; cancel them all."""
        with self._lock:
            for ev in self._cancels.values():
                ev.set()
            self._cancels.clear()  # late captures of that stream are dropped by epoch

    def forget(self, job: str, generation: int) -> None:
        """The generation is over (committed): drop its cancel flag."""
        with self._lock:
            self._cancels.pop((job, generation), None)

    def wait(self, timeout: float = 30.0) -> bool:
        """Wait for running uploads to end; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            threads[0].join(left)
