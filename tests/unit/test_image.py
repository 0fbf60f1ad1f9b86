"""The image format: write, load, read back; holes; validation; output directory rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cpcoord.errors import ImageInvalid, OutputNotEmpty, OutputNotWritable
from cpcoord.image import (
    FORMAT,
    load_image,
    read_pages,
    region_bytes,
    runs_of,
    stored_offsets,
)
from cpcoord.image_writer import ImageWriter
from cpcoord.ranges import PAGE_SIZE

BASE = 0x7F0000000000


def _pages(offsets: list[int], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(1, 255, size=(len(offsets), PAGE_SIZE), dtype=np.uint8)
    return data


def _data_extents(path: Path) -> list[tuple[int, int]]:
    """Byte extents that hold data (SEEK_DATA/SEEK_HOLE): holes are what is left."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h))
            off = h
    finally:
        os.close(fd)
    return out


def test_roundtrip_with_zero_pages_as_holes(tmp_path: Path) -> None:
    out = tmp_path / "img"
    offsets = [0, 1, 2, 5, 6, 9]
    data = _pages(offsets)
    data[1] = 0  # a captured zero page
    zero = np.asarray(~data.any(axis=1), dtype=bool)
    w = ImageWriter(out, job="j1", generation=3)
    w.add_member("rank0", 4242, 777)
    w.add_region(
        "rank0",
        4242,
        777,
        "heap",
        BASE,
        BASE + 12 * PAGE_SIZE,
        np.array(offsets, dtype=np.uint64),
        data,
        zero,
    )
    img = w.commit()
    assert not (out / "image.json.tmp").exists()

    doc = json.loads((out / "image.json").read_text())
    assert doc["format"] == FORMAT
    assert doc["job"] == "j1" and doc["generation"] == 3
    assert doc["parent"] is None and doc["tracker"] is None
    m = doc["members"][0]
    assert (m["name"], m["pid"], m["start_time"]) == ("rank0", 4242, 777)
    r = m["regions"][0]
    assert r == {
        "name": "heap",
        "start": "0x7f0000000000",
        "end": "0x7f000000c000",
        "file": "rank0/heap.raw",
        "pages": [[0, 3], [5, 2], [9, 1]],
    }

    loaded = load_image(out)
    assert loaded.member("rank0").region("heap").pages.tolist() == [[0, 3], [5, 2], [9, 1]]
    assert loaded.job == img.job
    rows = region_bytes(loaded, "rank0", "heap")
    assert rows.shape == (12, PAGE_SIZE)
    assert np.array_equal(rows[offsets], data)
    assert not rows[[3, 4, 7, 8, 10, 11]].any()  # pages not captured read as zeros
    assert np.array_equal(read_pages(loaded, "rank0", "heap", [5, 9]), data[[3, 5]])

    # Pages 1 (zero) and the uncaptured ones are holes: only non-zero runs hold data.
    raw = out / "rank0" / "heap.raw"
    assert os.path.getsize(raw) == 12 * PAGE_SIZE
    extents = _data_extents(raw)
    covered = np.zeros(12, dtype=bool)
    for a, b in extents:
        covered[a // PAGE_SIZE : (b + PAGE_SIZE - 1) // PAGE_SIZE] = True
    assert not covered[[1, 3, 4, 7, 8, 10, 11]].any(), extents


def test_incremental_fields(tmp_path: Path) -> None:
    w = ImageWriter(tmp_path / "inc", generation=2, parent="../full", tracker="uffd-wp")
    data = _pages([4])
    w.add_region(
        "m",
        1,
        2,
        "r",
        BASE,
        BASE + 8 * PAGE_SIZE,
        np.array([4], dtype=np.uint64),
        data,
        all_pages=np.array([0, 1, 4], dtype=np.uint64),
    )
    w.commit()
    doc = json.loads((tmp_path / "inc" / "image.json").read_text())
    assert doc["parent"] == "../full" and doc["tracker"] == "uffd-wp"
    reg = doc["members"][0]["regions"][0]
    assert reg["pages"] == [[4, 1]] and reg["all_pages"] == [[0, 2], [4, 1]]
    img = load_image(tmp_path / "inc")
    allp = img.members[0].regions[0].all_pages
    assert allp is not None and stored_offsets(allp).tolist() == [0, 1, 4]


def test_output_directory_rules(tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(OutputNotEmpty) as e:
        ImageWriter(full)
    assert "is not empty" in str(e.value)
    assert (full / "keep.txt").read_text() == "mine"

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputNotWritable) as e2:
        ImageWriter(afile / "img")
    assert str(e2.value).startswith(f"cannot write output directory {afile / 'img'}")
    with pytest.raises(OutputNotWritable):
        ImageWriter(afile)

    empty = tmp_path / "empty"
    empty.mkdir()
    w = ImageWriter(empty)  # an existing empty directory is fine
    w.add_region("m", 1, 2, "r", BASE, BASE + PAGE_SIZE, np.array([0], np.uint64), _pages([0]))
    w.abort()
    assert empty.is_dir() and not any(empty.iterdir())  # ours removed, the dir kept

    new = tmp_path / "new" / "deeper"
    w2 = ImageWriter(new)
    w2.abort()
    assert not new.exists()


def _write_simple(out: Path) -> None:
    w = ImageWriter(out)
    w.add_region("m", 1, 2, "r", BASE, BASE + 2 * PAGE_SIZE, np.array([1], np.uint64), _pages([1]))
    w.commit()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d.update(format="other/1"), "format is 'other/1'"),
        (lambda d: d["members"][0]["regions"][0].update(file="../../etc/passwd"), "file must be"),
        (lambda d: d["members"][0]["regions"][0].update(start="4096"), "hex string"),
        (lambda d: d["members"][0]["regions"][0].update(pages=[[1, 1], [0, 1]]), "sorted"),
        (lambda d: d["members"][0]["regions"][0].update(pages=[[1, 5]]), "past the end"),
        (lambda d: d["members"][0].update(name="../x"), "invalid name"),
        (lambda d: d.pop("job"), "missing or mistyped field"),
        (lambda d: d.update(page_size=65536), "page size"),
    ],
)
def test_load_rejects_bad_metadata(tmp_path: Path, mutate: object, reason: str) -> None:
    out = tmp_path / "img"
    _write_simple(out)
    doc = json.loads((out / "image.json").read_text())
    mutate(doc)  # type: ignore[operator]
    (out / "image.json").write_text(json.dumps(doc))
    with pytest.raises(ImageInvalid) as e:
        load_image(out)
    assert reason in str(e.value), str(e.value)


def test_load_rejects_missing_or_wrong_sized_raw(tmp_path: Path) -> None:
    out = tmp_path / "img"
    _write_simple(out)
    raw = out / "m" / "r.raw"
    os.truncate(raw, PAGE_SIZE)
    with pytest.raises(ImageInvalid, match="has 4096 bytes"):
        load_image(out)
    raw.unlink()
    with pytest.raises(ImageInvalid, match=r"missing m/r\.raw"):
        load_image(out)
    with pytest.raises(ImageInvalid, match=r"no image\.json"):
        load_image(tmp_path)


def test_runs_of_and_back() -> None:
    offs = np.array([0, 1, 2, 7, 9, 10], dtype=np.uint64)
    assert runs_of(offs).tolist() == [[0, 3], [7, 1], [9, 2]]
    assert stored_offsets(runs_of(offs)).tolist() == offs.tolist()
