"""Chains of images and their flattening (cpcoord/image_chain.py), on synthetic images
written with ImageWriter: newest page wins, pages gone at the newest capture are dropped,
a page stored under another region name (same address) is found, and broken chains are
refused with ImageInvalid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cpcoord import cli
from cpcoord.errors import ImageInvalid
from cpcoord.image import load_image, region_bytes, stored_offsets
from cpcoord.image_chain import load_chain, materialize, parent_link
from cpcoord.image_writer import ImageWriter
from cpcoord.ranges import PAGE_SIZE

BASE = 0x7F0000000000


def page(tag: int) -> np.ndarray:
    return np.full(PAGE_SIZE, tag % 251 + 1, dtype=np.uint8)


def write(
    out: Path,
    regions: dict[str, tuple[int, int, dict[int, int], list[int] | None]],
    parent: Path | None = None,
    gen: int = 1,
    pid: int = 42,
) -> Path:
    """regions: name -> (start, npages, {offset: tag stored}, all_pages or None)."""
    w = ImageWriter(out, generation=gen, parent=parent_link(out, parent) if parent else None,
                    tracker="hash" if parent else None)  # fmt: skip
    w.add_member("m", pid, 7)
    for name, (start, npages, stored, allp) in regions.items():
        offs = np.array(sorted(stored), dtype=np.uint64)
        data = (
            np.stack([page(stored[o]) for o in sorted(stored)])
            if stored
            else np.zeros((0, PAGE_SIZE), dtype=np.uint8)
        )
        a = None if allp is None else np.array(sorted(allp), dtype=np.uint64)
        w.add_region("m", pid, 7, name, start, start + npages * PAGE_SIZE, offs, data, None, a)
    w.commit()
    return out


def flat(path: Path) -> dict[str, dict[int, int]]:
    """region -> {offset: first byte} of the materialised chain."""
    return {
        r.name: {int(o): int(row[0]) for o, row in zip(r.pages, r.data, strict=True)}
        for r in materialize(path)
    }


def test_newest_page_wins_and_gone_pages_drop(tmp_path: Path) -> None:
    g1 = write(tmp_path / "1", {"a": (BASE, 8, {0: 1, 1: 2, 2: 3, 5: 4}, None)})
    g2 = write(tmp_path / "2", {"a": (BASE, 8, {1: 20}, [0, 1, 2, 6])}, g1, 2)
    g3 = write(tmp_path / "3", {"a": (BASE, 10, {6: 30, 9: 31}, [0, 1, 6, 9])}, g2, 3)
    assert [i.generation for i in load_chain(g3)] == [3, 2, 1]
    got = flat(g3)["a"]
    assert got == {0: page(1)[0], 1: page(20)[0], 6: page(30)[0], 9: page(31)[0]}


def test_page_stored_under_another_region_name(tmp_path: Path) -> None:
    """--range changed between captures: same addresses, new region names."""
    g1 = write(tmp_path / "1", {"r1": (BASE, 4, {0: 1, 3: 2}, None)})
    g2 = write(tmp_path / "2", {"r2": (BASE + PAGE_SIZE * 2, 4, {}, [1])}, g1, 2)
    assert flat(g2) == {"r2": {1: page(2)[0]}}


def test_flatten_writes_a_full_image(tmp_path: Path) -> None:
    g1 = write(tmp_path / "1", {"a": (BASE, 4, {0: 1, 1: 0xFF - 1, 2: 3}, None)})
    g2 = write(tmp_path / "2", {"a": (BASE, 4, {2: 9}, [0, 2])}, g1, 2)
    out = tmp_path / "full"
    code = cli.main(["image", "flatten", str(g2), "--out", str(out)])
    assert code == 0
    img = load_image(out)
    assert img.parent is None and img.tracker is None and img.generation == 2
    (r,) = img.member("m").regions
    assert r.all_pages is None and stored_offsets(r.pages).tolist() == [0, 2]
    rows = region_bytes(img, "m", "a")
    assert np.array_equal(rows[0], page(1)) and np.array_equal(rows[2], page(9))
    assert not rows[[1, 3]].any()


def test_missing_page_is_an_error(tmp_path: Path) -> None:
    g1 = write(tmp_path / "1", {"a": (BASE, 4, {0: 1}, None)})
    g2 = write(tmp_path / "2", {"a": (BASE, 4, {}, [0, 3])}, g1, 2)
    with pytest.raises(ImageInvalid, match="stored nowhere"):
        list(materialize(g2))
    assert cli.main(["image", "flatten", str(g2), "--out", str(tmp_path / "f")]) == 31
    assert not (tmp_path / "f").exists()


def test_broken_chains_are_refused(tmp_path: Path) -> None:
    g1 = write(tmp_path / "1", {"a": (BASE, 2, {0: 1}, None)})
    g2 = write(tmp_path / "2", {"a": (BASE, 2, {}, [0])}, g1, 2)
    # another process in the parent
    other = write(tmp_path / "o", {"a": (BASE, 2, {0: 1}, None)}, pid=43)
    g3 = write(tmp_path / "3", {"a": (BASE, 2, {}, [0])}, other, 2)
    with pytest.raises(ImageInvalid, match="another process"):
        load_chain(g3)
    # a loop: make the parent point at the child
    doc = json.loads((g1 / "image.json").read_text())
    doc["parent"] = "../2"
    doc["generation"] = 3
    (g1 / "image.json").write_text(json.dumps(doc))
    with pytest.raises(ImageInvalid, match=r"generation|loops"):
        load_chain(g2)
    # a missing parent
    import shutil

    shutil.rmtree(g1)
    with pytest.raises(ImageInvalid, match="parent"):
        load_chain(g2)
