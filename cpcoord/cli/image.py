"""`cpcoord image`: work on image directories without a coordinator.

`cpcoord image flatten DIR --out FULL` materialises the chain ending at DIR (an
incremental image and its parents, cpcoord/image_chain.py) into one full image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

NAME = "image"
HELP = "work on image directories (flatten an incremental chain)"
DESCRIPTION = """\
Image directories are what `cpcoord capture` writes. An incremental image (captured with
--parent) stores only the pages changed since its parent; `flatten` follows the parent
links down to a full image and writes one full image holding, for every page of the
newest image's regions, the newest bytes stored for it. Pages gone at the newest capture
are dropped."""
EPILOG = """\
examples:
  cpcoord image flatten ckpt-3 --out ckpt-3-full
  cpcoord image flatten ckpt-3 --out ckpt-3-full --json"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="image_command", metavar="ACTION")
    sub.required = True
    f = sub.add_parser(
        "flatten",
        help="write a chain of images as one full image",
        description="Write the chain ending at DIR as one full image directory.",
        epilog="example:\n  cpcoord image flatten ckpt-3 --out ckpt-3-full",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("dir", metavar="DIR", help="the newest image of the chain")
    f.add_argument("--out", required=True, metavar="FULL", help="new or empty directory")
    f.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    from cpcoord.image_chain import flatten, load_chain

    t0 = time.perf_counter()
    src = Path(args.dir)
    chain = load_chain(src)  # validated once up front: a broken chain writes nothing
    image = flatten(src, Path(args.out))
    regions = [r for m in image.members for r in m.regions]
    pages = sum(int(r.pages[:, 1].sum()) for r in regions)
    summary = {
        "image": str(image.path),
        "chain": [str(i.path) for i in chain],
        "generation": image.generation,
        "members": len(image.members),
        "regions": len(regions),
        "pages": pages,
        "seconds": round(time.perf_counter() - t0, 6),
    }
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(
            f"flattened {len(chain)} images ({chain[0].path} back to {chain[-1].path}) into "
            f"{image.path}: {len(image.members)} members, {len(regions)} regions, {pages} pages"
        )
    return 0
