"""Known page contents, shared by the target program and the tests that check captures.

A *stamped* page is 512 uint64 words: even words hold a tag (magic, mapping id, page
index), odd words hold a counter. Tags never change after the first stamp and are never
zero, so a page is recognisable wherever it ends up; counters tell which write it holds.

A *writer* (a thread of the target) owns `per` consecutive pages of a mapping and, at step
s = 1, 2, ..., stores counter s into every odd word of its page (s - 1) % per. Whatever
instant the writer is stopped at, its pages are fully described by one step number plus
at most one page that is half way from its old counter to the new one. `check_writer`
infers that state from captured bytes and fails on anything no single instant explains
(a torn or mixed copy), which is how tests tell that a capture equals the memory at the
freeze even though the writers never pause.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

PAGE = 4096
WORDS = PAGE // 8
MAGIC = 0xC0DE

U64 = npt.NDArray[np.uint64]


def tags(mid: int, first: int, count: int) -> U64:
    """Tag word of pages `[first, first + count)` of mapping `mid`."""
    idx = np.arange(first, first + count, dtype=np.uint64)
    return np.uint64((MAGIC << 48) | (mid << 32)) | idx


def stamped(mid: int, first: int, count: int, counter: int | U64 = 0) -> U64:
    """`(count, WORDS)` words of stamped pages with the given counter(s)."""
    out = np.empty((count, WORDS), dtype=np.uint64)
    out[:, 0::2] = tags(mid, first, count)[:, None]
    out[:, 1::2] = np.asarray(counter, dtype=np.uint64).reshape(-1, 1)
    return out


def random_pages(seed: int, first: int, count: int) -> U64:
    """Incompressible pages, reproducible per (seed, page index) in any slice."""
    out = np.empty((count, WORDS), dtype=np.uint64)
    # One generator per 256-page block keeps any slice cheap to recompute.
    block = 256
    for b in range(first // block, (first + count + block - 1) // block):
        rng = np.random.default_rng([seed, b])
        vals = rng.integers(0, 2**63, size=(block, WORDS), dtype=np.uint64, endpoint=False)
        vals |= np.uint64(1) << np.uint64(63)  # never an all-zero page
        lo, hi = max(first, b * block), min(first + count, (b + 1) * block)
        out[lo - first : hi - first] = vals[lo - b * block : hi - b * block]
    return out


def writer_counters(per: int, step: int) -> U64:
    """Counter of each of a writer's `per` pages once it has completed `step` steps."""
    j = np.arange(per, dtype=np.int64)
    # Page j is written at steps j+1, j+1+per, ...: the last one not after `step`.
    last = np.where(step >= j + 1, j + 1 + per * ((step - (j + 1)) // per), 0)
    return last.astype(np.uint64)


def check_writer(words: U64, mid: int, first: int, per: int) -> int:
    """Check a writer's `per` pages `(per, WORDS)` as captured; return the step they show.

    Raises AssertionError unless every tag is intact and the counters equal the state of
    the writer at one instant: all pages at `writer_counters(per, s)`, except possibly the
    page of step s + 1 whose words hold either its old counter or s + 1.
    """
    assert words.shape == (per, WORDS), words.shape
    want_tags = tags(mid, first, per)
    bad = np.flatnonzero((words[:, 0::2] != want_tags[:, None]).any(axis=1))
    assert bad.size == 0, f"tags damaged on pages {(bad + first).tolist()[:8]}"
    c = words[:, 1::2]
    top = int(c.max())
    if top == 0:
        return 0
    page = (top - 1) % per
    old = writer_counters(per, top - 1)
    partial = c[page] != np.uint64(top)
    if partial.any():
        # Step `top` was in flight: its page mixes old and new counters.
        assert np.all(c[page][partial] == old[page]), (
            f"page {first + page}: counters {np.unique(c[page]).tolist()[:6]} are neither "
            f"{top} nor its previous {int(old[page])}"
        )
        step = top - 1
    else:
        step = top
    want = writer_counters(per, step)
    rows = np.arange(per) != page
    mism = np.flatnonzero((c[rows] != want[rows][:, None]).any(axis=1))
    assert mism.size == 0, (
        f"writer pages {first}..{first + per - 1} do not match one instant (step {step}): "
        f"first bad page {first + int(np.flatnonzero(rows)[mism[0]])}"
    )
    return step
