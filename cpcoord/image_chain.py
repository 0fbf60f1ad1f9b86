"""Chains of images: following `parent` links and flattening a chain into a full image.

Owns what an incremental image means when read back (format in cpcoord/image.py): a
region's `all_pages` are every page it held at its capture, `pages` those stored in this
image; any other page of `all_pages` holds what the nearest ancestor that stored it holds
(same member, same address: trackers and the capture layer work on addresses, so a page
may have been stored under another region name, e.g. before a `--range` changed). Pages
that are not in the newest image's `all_pages` are gone and are dropped.

`parent` is a path, relative to the image's own directory unless absolute (the capture
command writes it relative, so a chain can be moved as a whole). Nothing here imports
nodeagent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cpcoord.errors import ImageInvalid
from cpcoord.image import Image, ImageRegion, load_image, region_bytes, stored_offsets
from cpcoord.image_writer import ImageWriter
from cpcoord.ranges import PAGE_SHIFT, PAGE_SIZE

MAX_CHAIN = 100_000  # links followed before a chain counts as broken (a cycle guard too)


def parent_path(image: Image) -> Path | None:
    """Where an image's parent lives, or None for a full image."""
    if image.parent is None:
        return None
    p = Path(image.parent)
    return p if p.is_absolute() else Path(os.path.normpath(image.path / p))


def parent_link(child_dir: Path, parent_dir: Path) -> str:
    """The `parent` value for a child written to `child_dir`: relative to it."""
    return os.path.relpath(parent_dir.resolve(), child_dir.resolve())


def load_chain(path: Path | str) -> list[Image]:
    """The chain ending at `path`, newest first, down to a full image. Raises
    ImageInvalid when a parent is missing or invalid, a link loops, generations do not
    decrease, or a member changes its process along the chain."""
    chain = [load_image(path)]
    seen = {Path(path).resolve()}
    while (pp := parent_path(chain[-1])) is not None:
        child = chain[-1]
        if len(chain) >= MAX_CHAIN or pp.resolve() in seen:
            raise ImageInvalid(child.path, f"parent chain loops at {pp}")
        seen.add(pp.resolve())
        try:
            parent = load_image(pp)
        except ImageInvalid as e:
            raise ImageInvalid(child.path, f"parent {pp}: {e.args[1]}") from None
        if parent.generation >= child.generation:
            raise ImageInvalid(
                child.path, f"parent {pp} has generation {parent.generation} >= {child.generation}"
            )
        for m in child.members:
            try:
                pm = parent.member(m.name)
            except KeyError:
                continue  # a member may be new in the child (its pages are all there)
            if (pm.pid, pm.start_time) != (m.pid, m.start_time):
                raise ImageInvalid(child.path, f"member {m.name} is another process in parent {pp}")
        chain.append(parent)
    return chain


def _names(img: Image) -> set[str]:
    return {m.name for m in img.members}


def _present(r: ImageRegion) -> npt.NDArray[np.uint64]:
    """Offsets of every page the region held (all_pages, or pages in a full image)."""
    return stored_offsets(r.all_pages if r.all_pages is not None else r.pages)


@dataclass(frozen=True)
class FlatRegion:
    """One region of a flattened chain: every page it held, with its bytes."""

    member: str
    pid: int
    start_time: int
    name: str
    start: int
    end: int
    pages: npt.NDArray[np.uint64]  # offsets from start, sorted
    data: npt.NDArray[np.uint8]  # (len(pages), PAGE_SIZE)


class _Stored:
    """The pages one image stores for one member, by absolute page number: one sorted
    index per image (built once), memory maps of its region files opened on demand."""

    def __init__(self, img: Image, member: str) -> None:
        self.img, self.member = img, member
        self.regions = img.member(member).regions
        offs = [stored_offsets(x.pages) for x in self.regions]
        pages = [
            o + np.uint64(x.start >> PAGE_SHIFT) for o, x in zip(offs, self.regions, strict=True)
        ]
        which = [np.full(o.size, i, dtype=np.int32) for i, o in enumerate(offs)]
        cat = np.concatenate(pages) if pages else np.zeros(0, dtype=np.uint64)
        order = np.argsort(cat, kind="stable")
        self.pages = cat[order]
        self.region = (np.concatenate(which) if which else np.zeros(0, np.int32))[order]
        self.offset = (np.concatenate(offs) if offs else np.zeros(0, np.uint64))[order]
        self._rows: dict[int, npt.NDArray[np.uint8]] = {}

    def rows(self, i: int) -> npt.NDArray[np.uint8]:
        if i not in self._rows:
            self._rows[i] = region_bytes(self.img, self.member, self.regions[i].name)
        return self._rows[i]

    def fill(
        self, want: npt.NDArray[np.uint64], todo: npt.NDArray[np.bool_], data: npt.NDArray[np.uint8]
    ) -> None:
        """Copy the still-missing `want` pages this image stores into `data`."""
        if self.pages.size == 0:
            return
        rows = np.flatnonzero(todo)
        cand = want[rows]
        idx = np.searchsorted(self.pages, cand)
        ok = idx < self.pages.size
        ok[ok] = self.pages[idx[ok]] == cand[ok]
        if not ok.any():
            return
        hit, src = rows[ok], idx[ok]
        for reg in np.unique(self.region[src]).tolist():
            sel = self.region[src] == reg
            data[hit[sel]] = self.rows(reg)[self.offset[src[sel]].astype(np.int64)]
        todo[hit] = False


def materialize(path: Path | str) -> Iterator[FlatRegion]:
    """The newest image of the chain at `path` with every page resolved, region by region
    (memory: one region's pages at a time). Raises ImageInvalid when a page of
    `all_pages` is stored nowhere in the chain."""
    chain = load_chain(path)
    newest = chain[0]
    for m in newest.members:
        stores = [_Stored(img, m.name) for img in chain if m.name in _names(img)]
        for r in m.regions:
            offs = _present(r)
            want = offs + np.uint64(r.start >> PAGE_SHIFT)  # absolute page numbers
            data = np.zeros((want.size, PAGE_SIZE), dtype=np.uint8)
            todo = np.ones(want.size, dtype=np.bool_)
            for st in stores:
                if not todo.any():
                    break
                st.fill(want, todo, data)
            if todo.any():
                first = int(want[np.flatnonzero(todo)[0]]) << PAGE_SHIFT
                raise ImageInvalid(
                    newest.path,
                    f"page 0x{first:x} of {m.name}/{r.name} is stored nowhere in the chain "
                    f"({int(np.count_nonzero(todo))} pages missing)",
                )
            yield FlatRegion(m.name, m.pid, m.start_time, r.name, r.start, r.end, offs, data)


def zero_rows(data: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Which rows are all zeros (written as holes), in bounded chunks."""
    out = np.zeros(data.shape[0], dtype=np.bool_)
    step = 8192
    for i in range(0, data.shape[0], step):
        out[i : i + step] = ~data[i : i + step].any(axis=1)
    return out


def flatten(path: Path | str, out: Path | str) -> Image:
    """Write the chain ending at `path` as one full image at `out` (new or empty):
    the newest image's job, generation, members and regions, every page of its
    `all_pages` with the newest bytes stored for it, no parent."""
    newest = load_image(path)
    writer = ImageWriter(Path(out), job=newest.job, generation=newest.generation)
    try:
        for m in newest.members:
            writer.add_member(m.name, m.pid, m.start_time)
        for fr in materialize(path):
            writer.add_region(
                fr.member,
                fr.pid,
                fr.start_time,
                fr.name,
                fr.start,
                fr.end,
                fr.pages,
                fr.data,
                zero_rows(fr.data),
            )
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
