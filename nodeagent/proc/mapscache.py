"""A process's maps read once per change, and what is derived from them computed once.

Owns two caches that keep a checkpoint of a process with tens of thousands of mappings
linear *and* cheap in the frozen window, where every step per mapping is a few
microseconds of Python:

- `read_maps_shared(pid)`: /proc/PID/maps, returned as the *same list object* as the last
  read of that pid whenever the text is unchanged (one string comparison). The list is
  shared: callers must never mutate it.
- `@derived`: a function of such lists (and of other immutable arguments) remembers its
  last results by the *identity* of its list and tuple arguments (it holds them, so an
  identity is never reused while remembered) and by the value of the others. Region
  sets, tracked mappings, segments and spans are then computed once per maps change, not
  once per capture: before the freeze (staging estimate) and in the frozen window of
  every later capture while the process maps nothing new.

Results are shared too: never mutated by their users.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from nodeagent.proc.procfs import Mapping, parse_maps, read_maps_text

P = ParamSpec("P")
R = TypeVar("R")

_PIDS = 64  # processes whose last maps are kept
_RESULTS = 8  # results kept per derived function
_lock = threading.Lock()
_last: OrderedDict[int, tuple[str, list[Mapping]]] = OrderedDict()


def read_maps_shared(pid: int) -> list[Mapping]:
    """read_maps(pid); the previous list itself when the maps did not change."""
    text = read_maps_text(pid)
    with _lock:
        hit = _last.get(pid)
        if hit is not None and hit[0] == text:
            _last.move_to_end(pid)
            return hit[1]
    maps = parse_maps(text)
    with _lock:
        _last[pid] = (text, maps)
        _last.move_to_end(pid)
        while len(_last) > _PIDS:
            _last.popitem(last=False)
    return maps


def forget(pid: int) -> None:
    with _lock:
        _last.pop(pid, None)


def _key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """(key, the arguments that must be the very same objects): lists and tuples count by
    identity, everything else by value."""
    key: list[Any] = []
    same: list[Any] = []
    for name, v in (*((None, a) for a in args), *sorted(kwargs.items())):
        if isinstance(v, (list, tuple)):
            key.append((name, "id", id(v)))
            same.append(v)
        else:
            key.append((name, v))
    return tuple(key), tuple(same)


def derived(fn: Callable[P, R]) -> Callable[P, R]:
    """Remember `fn`'s last results (module docstring)."""
    cache: OrderedDict[tuple[Any, ...], tuple[tuple[Any, ...], R]] = OrderedDict()
    clock = threading.Lock()

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        key, same = _key(args, kwargs)
        try:
            hash(key)
        except TypeError:  # an unhashable argument: nothing to remember
            return fn(*args, **kwargs)
        with clock:
            hit = cache.get(key)
            if hit is not None and all(a is b for a, b in zip(hit[0], same, strict=True)):
                cache.move_to_end(key)
                return hit[1]
        out = fn(*args, **kwargs)
        with clock:
            cache[key] = (same, out)
            cache.move_to_end(key)
            while len(cache) > _RESULTS:
                cache.popitem(last=False)
        return out

    return wrapper
