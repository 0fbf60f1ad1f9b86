"""What a node owes elsewhere, per generation: the common part of the drain (to the
store, nodeagent/cache/drain.py) and of partner copies (to the partner,
nodeagent/daemon/partner_send.py).

One thread works through generations of pack names, oldest first, while there is a
target to send them to (the store, the partner). Work comes from two places: a
generation this agent saw commit (`want`), and the coordinator's list of what is owed
(`replace`, the authority, at every Welcome or partner change). A generation that is
done leaves the list (unless the list was replaced meanwhile); one that failed is tried
again later, after the others.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from nodeagent.cache.store import GenKey

T = TypeVar("T")


class Worklist(Generic[T]):
    """Subclasses say what one generation's work is (`work`: True when done with it,
    False to try again later) and set the target (`set_target`)."""

    def __init__(self, thread_name: str) -> None:
        self.target: T | None = None
        self._todo: OrderedDict[GenKey, list[str]] = OrderedDict()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def set_target(self, target: T | None) -> None:
        with self._cond:
            self.target = target
            self._cond.notify_all()

    def want(self, job: str, generation: int, names: Sequence[str]) -> None:
        if not names:
            return
        with self._cond:
            self._todo.setdefault((job, generation), list(names))
            self._cond.notify_all()

    def replace(self, items: Iterable[tuple[str, int, Sequence[str]]]) -> None:
        """The coordinator's list: exactly what is owed, oldest first."""
        with self._cond:
            self._todo = OrderedDict(((job, gen), list(names)) for job, gen, names in items)
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return sum(len(v) for v in self._todo.values())

    def work(self, k: GenKey, names: list[str], target: T) -> bool:
        raise NotImplementedError

    def _next(self) -> tuple[GenKey, list[str], T] | None:
        with self._cond:
            while not self._stop and (not self._todo or self.target is None):
                self._cond.wait(1.0)
            if self._stop or self.target is None:
                return None
            k, names = next(iter(self._todo.items()))
            return k, list(names), self.target  # a copy: `want` may extend the item

    def _run(self) -> None:
        while True:
            got = self._next()
            if got is None:
                return
            k, names, target = got
            done = self.work(k, names, target)
            with self._cond:
                if done or self._stop:
                    if self._todo.get(k) == names:
                        self._todo.pop(k, None)
                elif k in self._todo:  # try again later, after the others
                    self._todo.move_to_end(k)
                    self._cond.wait(1.0)
