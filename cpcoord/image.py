"""Image directories (`cpcoord-image/1`): the values, the JSON form and the reader.

Owns the on-disk image format (also what `cpcoord export` writes and `image flatten`
reads):

    DIR/image.json              {"format": "cpcoord-image/1", "job", "generation",
                                 "parent", "tracker", "page_size", "members": [{"name",
                                 "pid", "start_time", "regions": [{"name", "start", "end",
                                 "file", "pages": [[offset, count], ...],
                                 "all_pages": [...] (incremental images only)}]}]}
    DIR/<member>/<region>.raw   the region's bytes at their offset from `start`; pages
                                not stored (and zero pages) are holes that read as zeros

`start`/`end` are hex strings; runs count pages from `start`. A region's `pages` lists
every page stored in this image, zero pages included (they are listed, but are holes);
`all_pages` lists every page the region held at the capture, present only in incremental
images, where `parent` names the parent image directory.

Writing lives in cpcoord/image_writer.py. A directory without image.json is not an
image. Nothing here imports nodeagent: pages arrive and leave as NumPy arrays.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cpcoord.errors import ImageInvalid, InvalidName
from cpcoord.ranges import PAGE_SIZE, check_name

FORMAT = "cpcoord-image/1"
META = "image.json"
Runs = npt.NDArray[np.uint64]  # (n, 2) [offset, count], in pages from the region start


@dataclass(frozen=True)
class ImageRegion:
    name: str
    start: int
    end: int
    pages: Runs
    all_pages: Runs | None = None

    @property
    def npages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE


@dataclass(frozen=True)
class ImageMember:
    name: str
    pid: int
    start_time: int
    regions: tuple[ImageRegion, ...]

    def region(self, name: str) -> ImageRegion:
        """By name: one dict lookup (a member may have tens of thousands of regions)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(name) from None

    @cached_property
    def _by_name(self) -> dict[str, ImageRegion]:
        return {r.name: r for r in self.regions}


@dataclass(frozen=True)
class Image:
    path: Path
    job: str
    generation: int
    members: tuple[ImageMember, ...]
    parent: str | None = None
    tracker: str | None = None
    page_size: int = PAGE_SIZE

    def member(self, name: str) -> ImageMember:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)


def region_file(member: str, region: str) -> str:
    return f"{member}/{region}.raw"


# -- runs helpers (kept local: cpcoord must not import nodeagent) ----------------------


def runs_of(offsets: npt.NDArray[np.uint64]) -> Runs:
    """Sorted unique page offsets -> `(n, 2)` runs."""
    p = np.asarray(offsets, dtype=np.uint64)
    if p.size == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    brk = np.flatnonzero(np.diff(p) != 1) + 1
    lo = np.concatenate(([0], brk))
    hi = np.concatenate((brk, [p.size]))
    return np.stack((p[lo], (hi - lo).astype(np.uint64)), axis=1)


def _runs_json(runs: Runs) -> list[list[int]]:
    out: list[list[int]] = np.asarray(runs, dtype=np.uint64).reshape(-1, 2).tolist()
    return out


def _runs_parse(items: Any, npages: int, what: str) -> Runs:
    if not isinstance(items, list):
        raise ValueError(f"{what} must be a list of [offset, count]")
    if not items:
        return np.zeros((0, 2), dtype=np.uint64)
    try:
        raw = np.array(items)
    except ValueError:
        raise ValueError(f"{what}: each run must be [offset, count]") from None
    if raw.ndim != 2 or raw.shape[1] != 2 or raw.dtype.kind not in "iu":
        raise ValueError(f"{what}: each run must be [offset, count] with integers")
    if np.any(raw < 0) or np.any(raw[:, 1] == 0):
        raise ValueError(f"{what}: offsets must be >= 0 and counts >= 1")
    r = raw.astype(np.uint64)
    if r.shape[0] > 1 and np.any(r[1:, 0] < r[:-1, 0] + r[:-1, 1]):
        raise ValueError(f"{what}: runs must be sorted and must not overlap")
    if int(r[-1, 0] + r[-1, 1]) > npages:
        raise ValueError(f"{what}: runs go past the end of the region")
    return r


# -- JSON ---------------------------------------------------------------------------


def to_json(image: Image) -> dict[str, Any]:
    members = []
    for m in image.members:
        regions = []
        for r in m.regions:
            d: dict[str, Any] = {
                "name": r.name,
                "start": f"0x{r.start:x}",
                "end": f"0x{r.end:x}",
                "file": region_file(m.name, r.name),
                "pages": _runs_json(r.pages),
            }
            if r.all_pages is not None:
                d["all_pages"] = _runs_json(r.all_pages)
            regions.append(d)
        members.append(
            {"name": m.name, "pid": m.pid, "start_time": m.start_time, "regions": regions}
        )
    return {
        "format": FORMAT,
        "job": image.job,
        "generation": image.generation,
        "parent": image.parent,
        "tracker": image.tracker,
        "page_size": image.page_size,
        "members": members,
    }


def dumps(image: Image) -> str:
    """image.json text: indented, with one line per region (runs stay on that line)."""
    doc = to_json(image)
    members = doc.pop("members")
    lines = ["{"]
    lines += [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in doc.items()]
    lines.append(' "members": [')
    for i, m in enumerate(members):
        regions = m.pop("regions")
        head = json.dumps(m)[:-1]
        lines.append(f"  {head}, " + '"regions": [')
        lines += [
            "   " + json.dumps(r) + ("," if j < len(regions) - 1 else "")
            for j, r in enumerate(regions)
        ]
        lines.append("  ]}" + ("," if i < len(members) - 1 else ""))
    lines += [" ]", "}", ""]
    return "\n".join(lines)


def _hex(v: Any, what: str) -> int:
    if not isinstance(v, str) or not v.startswith("0x"):
        raise ValueError(f"{what} must be a hex string like 0x7f00...")
    return int(v, 16)


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return v


def from_json(doc: Any, path: Path) -> Image:
    """Validate and parse image.json; raises ImageInvalid with the reason."""
    try:
        if not isinstance(doc, dict):
            raise ValueError("image.json must hold an object")
        if doc.get("format") != FORMAT:
            raise ValueError(f"format is {doc.get('format')!r}, expected {FORMAT!r}")
        page_size = _int(doc.get("page_size", PAGE_SIZE), "page_size")
        if page_size != PAGE_SIZE:
            raise ValueError(f"page size {page_size} differs from this machine's {PAGE_SIZE}")
        parent, tracker = doc.get("parent"), doc.get("tracker")
        if parent is not None and not isinstance(parent, str):
            raise ValueError("parent must be a string or null")
        if tracker is not None and not isinstance(tracker, str):
            raise ValueError("tracker must be a string or null")
        members = []
        seen: set[str] = set()
        for md in doc.get("members") or []:
            mname = check_name(str(md["name"]))
            if mname in seen:
                raise ValueError(f"member {mname} appears twice")
            seen.add(mname)
            regions = []
            rseen: set[str] = set()
            for rd in md.get("regions") or []:
                rname = check_name(str(rd["name"]))
                if rname in rseen:
                    raise ValueError(f"region {rname} appears twice in member {mname}")
                rseen.add(rname)
                start, end = _hex(rd["start"], "start"), _hex(rd["end"], "end")
                if start % PAGE_SIZE or end % PAGE_SIZE or end <= start:
                    raise ValueError(f"region {rname}: bounds not page-aligned or empty")
                if rd.get("file") != region_file(mname, rname):
                    raise ValueError(f"region {rname}: file must be {region_file(mname, rname)}")
                npages = (end - start) // PAGE_SIZE
                pages = _runs_parse(rd.get("pages"), npages, f"region {rname} pages")
                allp = rd.get("all_pages")
                all_runs = None if allp is None else _runs_parse(allp, npages, "all_pages")
                regions.append(ImageRegion(rname, start, end, pages, all_runs))
            members.append(
                ImageMember(
                    mname,
                    _int(md["pid"], "pid"),
                    _int(md["start_time"], "start_time"),
                    tuple(regions),
                )
            )
        return Image(
            path=path,
            job=check_name(str(doc["job"])),
            generation=_int(doc["generation"], "generation"),
            members=tuple(members),
            parent=parent,
            tracker=tracker,
            page_size=page_size,
        )
    except (KeyError, TypeError) as e:
        raise ImageInvalid(path, f"missing or mistyped field {e}") from None
    except (ValueError, InvalidName) as e:
        raise ImageInvalid(path, str(e)) from None


# -- reading ------------------------------------------------------------------------


def load_image(path: Path | str) -> Image:
    """Load and validate an image directory (metadata and the raw files' sizes)."""
    p = Path(path)
    try:
        with open(p / META) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ImageInvalid(p, f"no {META}") from None
    except NotADirectoryError:
        raise ImageInvalid(p, "not a directory") from None
    except json.JSONDecodeError as e:
        raise ImageInvalid(p, f"{META} is not JSON: {e}") from None
    except OSError as e:
        raise ImageInvalid(p, e.strerror or str(e)) from None
    image = from_json(doc, p)
    for m in image.members:
        for r in m.regions:
            raw = p / region_file(m.name, r.name)
            try:
                size = raw.stat().st_size
            except OSError:
                raise ImageInvalid(p, f"missing {region_file(m.name, r.name)}") from None
            if size != r.end - r.start:
                raise ImageInvalid(p, f"{region_file(m.name, r.name)} has {size} bytes")
    return image


def region_bytes(image: Image, member: str, region: str) -> npt.NDArray[np.uint8]:
    """The whole region as a read-only `(npages, PAGE_SIZE)` array mapped from its file
    (holes read as zeros). Pages not listed in `pages` are zeros, not memory."""
    m = image.member(member)
    r = m.region(region)
    path = image.path / region_file(member, region)
    try:
        arr = np.memmap(path, dtype=np.uint8, mode="r", shape=(r.npages * PAGE_SIZE,))
    except OSError as e:
        raise ImageInvalid(image.path, f"{path.name}: {e.strerror or e}") from None
    return arr.reshape(r.npages, PAGE_SIZE)


def read_pages(
    image: Image, member: str, region: str, offsets: Sequence[int] | npt.NDArray[np.uint64]
) -> npt.NDArray[np.uint8]:
    """Copies of the given pages (offsets from the region start), `(n, PAGE_SIZE)`."""
    rows = region_bytes(image, member, region)
    idx = np.asarray(offsets, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= rows.shape[0]):
        raise ImageInvalid(image.path, f"page offset out of region {region}")
    return np.array(rows[idx])


def stored_offsets(runs: Runs) -> npt.NDArray[np.uint64]:
    """Page offsets listed by runs, vectorised."""
    r = np.asarray(runs, dtype=np.uint64).reshape(-1, 2)
    if r.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64)
    counts = r[:, 1].astype(np.int64)
    steps = np.ones(int(counts.sum()), dtype=np.int64)
    starts = r[:, 0].astype(np.int64)
    steps[0] = starts[0]
    firsts = np.cumsum(counts)[:-1]
    steps[firsts] = starts[1:] - (starts[:-1] + counts[:-1] - 1)
    return np.cumsum(steps).astype(np.uint64)
