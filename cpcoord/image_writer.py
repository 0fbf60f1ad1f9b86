"""Writing image directories (`cpcoord-image/1`, format in cpcoord/image.py).

Owns the output directory rules (new or empty, checked before any process is frozen),
writing each region's `.raw` file sparse (only non-zero runs are written, big runs by a
few threads and, on disk, with O_DIRECT), and the commit order that makes a directory an
image only once complete: raw files, fsync of all of them, image.json through a
temporary file and rename, fsync of the directories. `abort` removes what was created.

On tmpfs a capture can fill the raw files in place instead (`in_place`, module
cpcoord/image_files.py): the writer then only punches the zero pages and records them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cpcoord.errors import InvalidName, OutputNotEmpty, OutputNotWritable
from cpcoord.image import META, Image, ImageMember, ImageRegion, dumps, region_file, runs_of
from cpcoord.image_files import RegionFiles, memory_backed
from cpcoord.ranges import PAGE_SIZE, check_name

_MAX_IO = 1 << 30  # bytes per pwrite: below Linux's 0x7ffff000 cap per call


def prepare_output(out: Path) -> bool:
    """Make `out` an empty, writable directory; return True when we created it.

    Checked before any process is frozen, so a bad --out costs the target nothing.
    """
    created = False
    try:
        if out.exists() and not out.is_dir():
            raise OutputNotWritable(out, "exists and is not a directory")
        if out.is_dir():
            if any(out.iterdir()):
                raise OutputNotEmpty(out)
        else:
            out.mkdir(parents=True)
            created = True
        probe = out / ".cpcoord-probe"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        probe.unlink()
    except OSError as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise OutputNotWritable(out, e.strerror or str(e)) from None
    return created


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> int:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done : done + _MAX_IO], offset + done)
    return done


_SLICE = 32 << 20  # bytes per pwrite job
# Runs at least this big go around the page cache on disk (O_DIRECT): no second copy of
# the image in memory and no writeback to wait for at fsync, the device takes the bytes
# straight from the caller's buffer. Smaller ones are cheaper buffered (a direct write
# waits for the device).
DIRECT_MIN = 1 << 20

_Job = tuple[memoryview, int, int]  # (bytes, their address, file offset)


class _RawFile:
    """A new `.raw` file open for writing, plus an O_DIRECT descriptor when asked for and
    the filesystem has one (else, and for any job it refuses, writes are buffered)."""

    def __init__(self, path: Path, direct: bool) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.dfd = -1
        if direct:
            with contextlib.suppress(OSError):
                self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)

    def write(self, job: _Job) -> int:
        buf, addr, offset = job
        if self.dfd >= 0 and len(buf) >= DIRECT_MIN and addr % PAGE_SIZE == 0:
            try:
                return _pwrite_all(self.dfd, buf, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:  # alignment this device does not take
                    raise
        return _pwrite_all(self.fd, buf, offset)

    def close(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dfd = -1


def _write_jobs(f: _RawFile, jobs: list[_Job]) -> int:
    """Write every job; large batches on a few threads (pwrite drops the GIL: filling
    page cache is CPU work that spreads over cores, direct writes keep the device busy)."""
    total = sum(len(j[0]) for j in jobs)
    workers = min(4, os.cpu_count() or 1, len(jobs))
    if workers <= 1 or total < 2 * _SLICE:
        return sum(f.write(j) for j in jobs)
    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(f.write, jobs))


@dataclass
class _PendingMember:
    name: str
    pid: int
    start_time: int
    regions: list[ImageRegion] = field(default_factory=list)
    names: set[str] = field(default_factory=set)  # of `regions`: a lookup, not a scan


class ImageWriter:
    """Writes one image directory: `add_region` per region, then `commit` (or `abort`)."""

    def __init__(
        self,
        out: Path | str,
        *,
        job: str = "local",
        generation: int = 1,
        parent: str | None = None,
        tracker: str | None = None,
    ) -> None:
        self.out = Path(out)
        self.job = check_name(job)
        self.generation = generation
        self.parent = parent
        self.tracker = tracker
        self._members: dict[str, _PendingMember] = {}
        self._created = prepare_output(self.out)
        self._files: list[Path] = []
        self._in_place: dict[str, RegionFiles] = {}
        self._tmpfs = memory_backed(self.out)  # in place; else O_DIRECT (tmpfs: a copy anyway)
        self.bytes_written = 0

    @property
    def memory_backed(self) -> bool:
        """The output is on tmpfs: a full capture can copy straight into its files."""
        return self._tmpfs

    def in_place(self, member: str) -> RegionFiles | None:
        """The member's region files to capture into directly, when the output is on tmpfs
        (else None: capture into staging and `add_region`). Record each region captured
        there with `add_region_in_place`; the others are removed at commit."""
        check_name(member)
        if member in self._in_place:
            return self._in_place[member]
        if not self._tmpfs:
            return None
        files = RegionFiles(self.out, member, self._files.append)
        self._in_place[member] = files
        return files

    def add_region_in_place(
        self,
        member: str,
        pid: int,
        start_time: int,
        name: str,
        start: int,
        end: int,
        pages: npt.NDArray[np.uint64],
        zero: npt.NDArray[np.bool_],
        all_pages: npt.NDArray[np.uint64] | None = None,
    ) -> ImageRegion:
        """Record a region whose pages a capture copied into `in_place(member)`: its zero
        pages (and anything else not stored) become holes."""
        files = self._in_place[member]
        pages = np.asarray(pages, dtype=np.uint64)
        m = self._member(member, pid, start_time, name)
        files.finish(name, pages[~zero])
        self.bytes_written += int(np.count_nonzero(~zero)) * PAGE_SIZE
        return self._record(m, name, start, end, pages, all_pages)

    def add_region(
        self,
        member: str,
        pid: int,
        start_time: int,
        name: str,
        start: int,
        end: int,
        pages: npt.NDArray[np.uint64],
        data: npt.NDArray[np.uint8],
        zero: npt.NDArray[np.bool_] | None = None,
        all_pages: npt.NDArray[np.uint64] | None = None,
    ) -> ImageRegion:
        """Write one region. `pages`: sorted page offsets stored in this image; `data`:
        `(len(pages), PAGE_SIZE)` rows in the same order; `zero`: rows known to be zero
        (written as holes). Only non-zero runs are written, each with one pwrite."""
        check_name(member)
        check_name(name)
        if start % PAGE_SIZE or end % PAGE_SIZE or end <= start:
            raise ValueError(f"region {name}: bounds must be page-aligned and non-empty")
        pages = np.asarray(pages, dtype=np.uint64)
        if data.shape != (pages.size, PAGE_SIZE):
            raise ValueError(f"region {name}: data shape {data.shape} != ({pages.size}, page)")
        m = self._member(member, pid, start_time, name)
        path = self.out / region_file(member, name)
        try:
            path.parent.mkdir(exist_ok=True)
            f = _RawFile(path, direct=not self._tmpfs)
            self._files.append(path)
            try:
                os.ftruncate(f.fd, end - start)  # holes everywhere first
                keep = np.ones(pages.size, dtype=np.bool_) if zero is None else ~zero
                rows = np.flatnonzero(keep)
                if rows.size:
                    # Runs over rows that are consecutive both in the file and in `data`.
                    offs = pages[rows]
                    brk = np.flatnonzero((np.diff(offs) != 1) | (np.diff(rows) != 1)) + 1
                    lo = np.concatenate(([0], brk))
                    hi = np.concatenate((brk, [rows.size]))
                    jobs: list[_Job] = []
                    for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
                        r0, r1 = int(rows[a]), int(rows[b - 1]) + 1
                        arr = np.ascontiguousarray(data[r0:r1])
                        chunk, at = arr.data.cast("B"), int(arr.ctypes.data)
                        off = int(offs[a]) * PAGE_SIZE
                        # Big runs go in slices so several threads can write them.
                        jobs += [
                            (chunk[i : i + _SLICE], at + i, off + i)
                            for i in range(0, len(chunk), _SLICE)
                        ]
                    self.bytes_written += _write_jobs(f, jobs)
            finally:
                f.close()
        except OSError as e:
            raise OutputNotWritable(self.out, e.strerror or str(e)) from None
        return self._record(m, name, start, end, pages, all_pages)

    def _member(self, member: str, pid: int, start_time: int, region: str) -> _PendingMember:
        m = self._members.setdefault(member, _PendingMember(member, pid, start_time))
        if region in m.names:
            raise InvalidName(f"{region} (twice in member {member})")
        return m

    @staticmethod
    def _record(
        m: _PendingMember,
        name: str,
        start: int,
        end: int,
        pages: npt.NDArray[np.uint64],
        all_pages: npt.NDArray[np.uint64] | None,
    ) -> ImageRegion:
        region = ImageRegion(
            name=name,
            start=start,
            end=end,
            pages=runs_of(pages),
            all_pages=None if all_pages is None else runs_of(all_pages),
        )
        m.regions.append(region)
        m.names.add(name)
        return region

    def add_member(self, name: str, pid: int, start_time: int) -> None:
        """Record a member even if it has no region (an empty capture is still a fact)."""
        check_name(name)
        self._members.setdefault(name, _PendingMember(name, pid, start_time))

    def commit(self) -> Image:
        image = Image(
            path=self.out,
            job=self.job,
            generation=self.generation,
            members=tuple(
                ImageMember(m.name, m.pid, m.start_time, tuple(m.regions))
                for m in self._members.values()
            ),
            parent=self.parent,
            tracker=self.tracker,
        )
        tmp = self.out / (META + ".tmp")
        try:
            self._close_in_place()
            self._sync_files()
            with open(tmp, "w") as f:
                f.write(dumps(image))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.out / META)
            dfd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for sub in {p.parent for p in self._files}:
                    sfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
                    os.fsync(sfd)
                    os.close(sfd)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            raise OutputNotWritable(self.out, e.strerror or str(e)) from None
        return image

    def _sync_files(self) -> None:
        """fsync every raw file, concurrently: the filesystem folds concurrent fsyncs
        into one journal commit, where one after another costs a disk flush each."""

        def sync(path: Path) -> None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        if not self._files:
            return
        with ThreadPoolExecutor(max_workers=min(16, len(self._files))) as pool:
            list(pool.map(sync, self._files))

    def _close_in_place(self) -> None:
        """Remove the in-place files of regions that are not in the image (prepared
        before the freeze, gone at the cut), unmap the others."""
        for member, files in self._in_place.items():
            m = self._members.get(member)
            recorded = {r.name for r in m.regions} if m is not None else set()
            for name in files.names():
                if name not in recorded:
                    path = files.directory / f"{name}.raw"
                    files.discard(name)
                    self._files.remove(path)
            files.close()

    def abort(self) -> None:
        """Remove what this writer created; a directory we did not create is emptied of
        our files only."""
        for files in self._in_place.values():
            files.close()
        if self._created:
            shutil.rmtree(self.out, ignore_errors=True)
            return
        for p in self._files:
            p.unlink(missing_ok=True)
        for sub in {p.parent for p in self._files}:
            with contextlib.suppress(OSError):
                sub.rmdir()
        (self.out / (META + ".tmp")).unlink(missing_ok=True)
