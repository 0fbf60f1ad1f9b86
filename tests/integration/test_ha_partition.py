"""A leader cut off from etcd stops committing before its lease can expire: never two
leaders committing.

Two replicas, each in a network namespace of its own (tests/helpers/replicas_netns.py),
etcd, one real agent and the CLI in a third. The provocation: replica 1 leads and is in
the middle of committing generation 2 (held by a fault hook just before its fence: packs
stored, no manifest yet) when nftables drops everything between it and etcd. It cannot
renew its lease; it steps down before the lease expires; only after that does etcd let
replica 2 win. Then the held commit resumes on the deposed leader, as a slow disk would
let it. It must not commit: no manifest of generation 2 is ever written, its row ends
ABORTED, the checkpoint fails, and replica 1 logs no commit after its "leadership
lost". Replica 2 takes the store over and the next checkpoint (the same address list)
commits and exports exactly.

Without the fence (coordinator/ha/election.py `fence`, called by the store's commit)
this test fails: the deposed leader writes generation 2's manifest and flips its row.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cpcoord.faults import release_file
from cpcoord.image import load_image, region_bytes
from testbed.daemons import wait_for
from testbed.driver import Target, task_states
from tests.conftest import require
from tests.helpers.replicas_netns import NetnsReplicas, log_time, remove_stale, tag_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
HOLD = "coordinator.commit.packs"


@pytest.fixture
def net(tmp_path: Path) -> Iterator[NetnsReplicas]:
    require(os.geteuid() == 0, "root (network namespaces)")
    missing = [t for t in ("ip", "nft", "etcd") if shutil.which(t) is None]
    require(not missing, f"{', '.join(missing)} (iproute2, nftables, etcd-server)")
    remove_stale()
    n = NetnsReplicas(tmp_path / "ha", tag_for(0))
    n.root.mkdir(parents=True)
    try:
        n.build()
        yield n
    finally:
        n.close()


def _export_matches(net: NetnsReplicas, t: Target, tmp: Path, gen: int) -> None:
    out = tmp / f"export-{gen}"
    net.cli("export", "--job", "job", "--generation", str(gen), "--out", str(out))
    im = load_image(out)
    (reg,) = im.member("m").regions
    assert np.array_equal(np.asarray(region_bytes(im, "m", reg.name)), t.read("data"))


def test_partitioned_leader_stops_committing(
    net: NetnsReplicas, target_factory: object, tmp_path: Path
) -> None:
    t: Target = target_factory(maps=["data:64"])  # type: ignore[operator]
    # Replica 1 first, alone: it leads (its second commit will be held), then replica 2.
    net.start_replica(0, hold=(f"{HOLD}@2",))
    wait_for(lambda: net.log_lines(0, "leading"), 30, "replica 1 leading")
    net.start_replica(1)
    net.start_agent("node-a")
    wait_for(lambda: net.cli("jobs", check=False).returncode == 0, 30, "the CLI reaches a leader")
    m = t.mapping("data")
    wait_for(
        lambda: net.cli("attach", "--job", "job", "--member", "m", "--pid", str(t.pid),
                        "--node", "node-a", "--range", f"{m.addr:#x}-{m.end:#x}",
                        check=False).returncode == 0,
        60, "attached (the agent connected)",
    )  # fmt: skip
    r = json.loads(net.cli("checkpoint", "--job", "job", "--json").stdout)
    assert r["state"] == "committed" and r["generation"] == 1
    _export_matches(net, t, tmp_path, 1)

    # Generation 2: its commit is held on replica 1, then replica 1 loses etcd.
    t.cmd("write", name="data", page=0, count=64, counter=7)
    proc = net.popen_cli("checkpoint", "--job", "job", "--json")
    wait_for((net.faults / f"{HOLD}.reached").exists, 60, "the commit held on replica 1")
    net.partition(0)
    t_cut = time.time()
    wait_for(lambda: net.log_lines(0, "leadership lost"), 30, "replica 1 stepping down")
    wait_for(lambda: net.log_lines(1, "elected"), 30, "replica 2 elected")
    assert net.dropped(0) > 0, "nothing was dropped: the partition did not happen"
    lost = log_time(net.log_lines(0, "leadership lost")[0])
    elected = log_time(net.log_lines(1, "elected")[0])
    # Replica 1 stepped down before its lease could expire (at most TTL after its last
    # renewal, which was before the cut), and replica 2 won only after that.
    assert lost < t_cut + net.leader_ttl, (lost - t_cut, net.leader_ttl)
    assert lost < elected, f"two leaders: replica 2 elected {lost - elected:.3f} s before"

    # The held commit resumes on the deposed leader: it must not commit.
    release_file(HOLD, net.faults).write_text("go\n")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 52, (out, err)  # GenerationAborted
    assert json.loads(out)["generation"] == 2
    wait_for(lambda: net.log_lines(1, "leading"), 60, "replica 2 took the store over")
    manifests = net.store / "manifests" / "job"
    assert not (manifests / f"{2:010d}").exists(), "the deposed leader wrote a manifest"
    after = [ln for ln in net.log_lines(0, "generation committed") if log_time(ln) >= lost]
    assert not after, f"replica 1 committed after losing its leadership: {after}"
    assert not any(s in "tT" for s in task_states(t.pid).values()), "member left frozen"

    # Replica 2 leads: generation 2 stays aborted, the next one commits exactly.
    gens = json.loads(net.cli("generations", "--job", "job", "--all", "--json").stdout)
    by = {g["generation"]: g["state"] for g in gens["generations"]}
    assert by[1] == "committed" and by.get(2, "aborted") == "aborted", by
    t.cmd("write", name="data", page=8, count=4, counter=9)
    wait_for(
        lambda: json.loads(net.cli("checkpoint", "--job", "job", "--json", check=False).stdout
                           or "{}").get("state") == "committed",
        60, "a checkpoint on the new leader",
    )  # fmt: skip
    latest = json.loads(net.cli("generations", "--job", "job", "--json").stdout)
    gen = latest["generations"][0]["generation"]  # newest first
    assert gen >= 3
    _export_matches(net, t, tmp_path, gen)
