"""The S3 store's server dies mid-upload, through the real coordinator.

A coordinator with `--store s3://...` on a SeaweedFS server of the test's own, a real
agent, real members: generation 1 commits (a small member); then a 256 MiB member of
random pages (incompressible: its packs take a while to go up) joins, and while
generation 2's packs are being written (a pack object or multipart upload of its own is
seen in the bucket) the `weed` server gets SIGKILL. Then:
- the checkpoint ends ABORTED with reason `store_error` (exit 52) once the backend's
  bounded retries give up; generation 2 is not visible, cannot be exported, generation
  1 still exports exactly; no member is stopped;
- SeaweedFS restarts on the same data directory and ports; the next checkpoint commits
  and exports byte for byte, `verify` passes (this once failed: generation 2's pack puts
  still in flight at its abort failed later and their error was raised into generation
  3; Repository.begin now drops such earlier failures);
- `gc` reclaims what the aborted generation left: afterwards the bucket's packs are
  exactly the indexed ones, the index holds exactly the chunks of committed manifests,
  no manifest is orphaned and no multipart upload is left unfinished.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.store import Kind
from coordinator.store.catalog import State
from cpcoord.image import load_image, region_bytes
from testbed.cluster import Cluster
from testbed.daemons import REPO, daemon_env, wait_for
from testbed.driver import Target, task_states
from testbed.seaweed import BUCKET, Seaweed
from tests.helpers.e2e import attach

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIG_PAGES = 65536  # 256 MiB of random pages: 16 packs of 16 MiB, seconds of upload


def _export(c: Cluster, gen: int, member: str, out: Path) -> np.ndarray:
    c.cli("export", "--job", "job", "--generation", str(gen), "--out", str(out))
    im = load_image(out)
    (reg,) = im.member(member).regions
    return np.asarray(region_bytes(im, member, reg.name)).reshape(-1)


def _packs(client: Any, prefix: str) -> set[str]:
    got = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/{Kind.PACKS.value}/")
    return {o["Key"] for o in got.get("Contents", [])}


def _uploading(client: Any, prefix: str, before: set[str]) -> bool:
    """A new pack of this store is being written or was: an object under packs/ that
    was not there `before`, or an unfinished multipart upload to one."""
    if _packs(client, prefix) - before:
        return True
    return bool(_unfinished(client, prefix))


def _unfinished(client: Any, prefix: str) -> list[str]:
    """Keys of this store's multipart uploads begun and neither completed nor aborted."""
    ups = client.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{prefix}/")
    return [u["Key"] for u in ups.get("Uploads", [])]


def _checkpoint(c: Cluster) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "cpcoord", "checkpoint", "--job", "job", "--json",
            "--coordinator", c.address]  # fmt: skip
    return subprocess.Popen(
        argv, cwd=REPO, env=daemon_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _stopped(*targets: Target) -> bool:
    return any(s in "tT" for t in targets for s in task_states(t.pid).values())


def test_seaweed_killed_mid_upload_aborts_and_the_next_generation_commits(
    seaweed_private: Seaweed,  # first: torn down after the cluster, which still uses it
    cluster_factory: Callable[..., Cluster],
    target_factory: Callable[..., Target],
    tmp_path: Path,
) -> None:
    sw = seaweed_private
    url = sw.url()
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    # Few attempts against a dead server, so the abort comes in seconds, not minutes.
    env = {**sw.env(), "CPCOORD_STATE_DIR": str(tmp_path / "state"), "AWS_MAX_ATTEMPTS": "3"}
    # The coordinator path: on the direct one the agent's cut-short uploads under
    # packs/nodes/ wait NODE_TEMP_GRACE before gc may remove them (storecore/backend.py).
    c = cluster_factory(
        nodes=("node-a",), store_url=url, extra_env=env,
        agent_args={"node-a": ("--data-path", "coordinator")},
    )  # fmt: skip
    small = target_factory(maps=["data:64"])
    big = target_factory(maps=[f"data:{BIG_PAGES}:anon:random:7"])

    attach(c, "job", "small", small, "node-a", "data")
    r1 = c.cli_json("checkpoint", "--job", "job")
    assert r1["state"] == "committed", r1
    g1 = int(r1["generation"])
    want1 = small.read("data").reshape(-1).copy()
    small.cmd("write", name="data", page=0, count=32, counter=2)
    attach(c, "job", "big", big, "node-a", "data")

    # -- generation 2: SIGKILL the S3 server while its packs go up ---------------------
    probe = sw.client(max_attempts=1, timeout=5)
    before = _packs(probe, prefix)  # generation 1's
    proc = _checkpoint(c)
    try:
        wait_for(
            lambda: _uploading(probe, prefix, before) or proc.poll() is not None,
            120,
            "generation 2's packs going up",
        )
        if proc.poll() is not None:
            raise AssertionError(
                f"generation 2 ended before its upload was seen: {proc.communicate()}"
            )
        sw.kill()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 52, (out, err, c.logs())  # GenerationAborted
    r2 = json.loads(out)
    assert r2["state"] == "aborted" and r2["reason"] == "store_error", r2
    g2 = int(r2["generation"])
    # Upload runs after thaw: nobody is stopped, the checkpoint did not wait on them.
    assert not _stopped(small, big), "a member is still stopped after the abort"
    assert c.members_running("job")

    # Not visible, not exportable; generation 1 untouched. The catalog is local, so
    # this holds while the S3 server is still down.
    gens = c.cli_json("generations", "--job", "job", "--all")["generations"]
    by = {g["generation"]: g["state"] for g in gens}
    assert by.get(g2, "aborted") == "aborted" and by[g1] == "committed", by
    visible = [g["generation"] for g in c.cli_json("generations", "--job", "job")["generations"]]
    assert visible == [g1], visible
    r = c.cli("export", "--job", "job", "--generation", str(g2), "--out",
              str(tmp_path / "never"), check=False)  # fmt: skip
    assert r.returncode in (66, 67), r.stderr  # NoSuchGeneration / not committed
    assert not (tmp_path / "never" / "image.json").exists()

    # -- back up: same data directory, same endpoint ---------------------------------
    sw.start()
    unfinished = _unfinished(probe, prefix)  # the multipart uploads the kill cut short
    assert np.array_equal(_export(c, g1, "small", tmp_path / "g1"), want1)
    # A quarter of the big member changes: the aborted generation's chunks of it are
    # garbage now, the rest may be reused from its packs (they were indexed).
    big.cmd("write", name="data", page=0, count=BIG_PAGES // 4, counter=3)
    r3 = c.cli_json("checkpoint", "--job", "job", check=False)
    assert r3["state"] == "committed", (r3["reason"], r3["detail"])
    g3 = int(r3["generation"])
    assert g3 > g2
    for name, t in (("small", small), ("big", big)):
        got = _export(c, g3, name, tmp_path / f"g3-{name}")
        assert np.array_equal(got, t.read("data").reshape(-1)), f"member {name} differs"
    assert c.cli_json("verify")["ok"]
    gc = c.cli_json("gc")
    # Something of generation 2 was left to reclaim: dead chunks in its stored packs, or
    # the multipart uploads the kill cut short (both are gone below).
    assert gc["chunks_dropped"] > 0 or unfinished, (gc, unfinished)
    assert c.cli_json("verify")["ok"]

    # -- nothing of the aborted generation is left unreferenced -------------------------
    assert c.coordinator is not None
    c.coordinator.stop()
    with c.open_repository() as repo:
        live: set[bytes] = set()
        manifests = set()
        for g in repo.catalog.generations():
            assert g.state is not State.PREPARING
            if g.state is State.COMMITTED:
                manifests.add(g.manifest)
                ids = repo.load_manifest(g.manifest or "").chunk_ids()
                live |= {ids[i].tobytes() for i in range(ids.size)}
        in_bucket = {o.name for o in repo.backend.list(Kind.MANIFESTS)}
        assert in_bucket == manifests, f"orphan manifests: {in_bucket - manifests}"
        indexed: set[bytes] = set()
        for ns in repo.index.namespaces.values():
            ids, _ = ns.all()
            indexed |= {ids[i].tobytes() for i in range(ids.size)}
        assert indexed == live, f"{len(indexed - live)} dead chunks left in the index"
        packs = {o.name for o in repo.backend.list(Kind.PACKS)}
        known = {p.name for p in repo.index.packs().values()}
        assert packs == known, f"unindexed packs {packs - known}, missing {known - packs}"
        assert not repo.backend.incomplete_uploads()  # type: ignore[attr-defined]
    assert not _unfinished(probe, prefix)
