"""What end-to-end tests do to a cluster through the `cpcoord` CLI: attach a member
(`attach`, for a target's mappings; testbed.cluster.attach_args for any pid and ranges), a
target of random memory per node attached as one member each (`attach_random`), export a
generation and read a member's region back from the export.

`c` is anything with `cli(*args)` that runs the CLI against its coordinator:
testbed.cluster.Cluster, tests.helpers.netns.NetCluster.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from cpcoord.image import load_image, region_bytes, stored_offsets
from testbed.cluster import attach_args
from testbed.driver import Target


class RunsCli(Protocol):
    def cli(self, *args: str) -> subprocess.CompletedProcess[str]: ...


def attach(
    c: RunsCli, job: str, member: str, t: Target, node: str, maps: str | Sequence[str] = "data"
) -> None:
    """Attach target `t` as `member` of `job` on `node`, its mappings `maps` as regions."""
    names = [maps] if isinstance(maps, str) else list(maps)
    ranges = [(t.mapping(m).addr, t.mapping(m).end) for m in names]
    c.cli(*attach_args(job, member, t.pid, node, ranges))


def attach_random(
    c: RunsCli,
    factory: Callable[..., Target],
    job: str,
    nodes: Sequence[str],
    pages: int,
    seed: int,
) -> dict[str, Target]:
    """One target per node of `nodes`, its mapping `data` of `pages` random pages (seed
    `seed + i`), attached as member `m{i}` of `job` on the i-th node: member -> target."""
    out = {}
    for i, node in enumerate(nodes):
        t = factory(maps=[f"data:{pages}:anon:random:{seed + i}"])
        attach(c, job, f"m{i}", t, node)
        out[f"m{i}"] = t
    return out


def export(c: RunsCli, job: str, n: int, out: Path) -> None:
    c.cli("export", "--job", job, "--generation", str(n), "--out", str(out))


def exported(out: Path, member: str) -> tuple[np.ndarray, np.ndarray]:
    """(region bytes as (pages, PAGE), page offsets the image lists) of a member's one region."""
    im = load_image(out)
    (reg,) = im.member(member).regions
    return np.array(region_bytes(im, member, reg.name)), stored_offsets(reg.pages)
