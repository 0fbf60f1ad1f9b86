"""The `cpcoord` CLI run in this process against an in-process coordinator with scripted
agents (tests/helpers/fake_agent.py): `cli`, `cli_json`, `setup_job` (a job of two
members on two fake agents), `rand` (seeded page contents).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpcoord.cli import main
from testbed.cluster import InProcessCoordinator
from tests.helpers.fake_agent import PAGE, FakeAgent


def rand(seed: int, pages: int) -> bytearray:
    return bytearray(np.random.default_rng(seed).integers(0, 256, pages * PAGE, np.uint8).tobytes())


def cli(c: InProcessCoordinator, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main([*args, "--coordinator", c.address])
    return code, capsys.readouterr().out


def cli_json(c: InProcessCoordinator, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code, out = cli(c, capsys, *args, "--json")
    assert code == 0, out
    return json.loads(out)


def setup_job(
    c: InProcessCoordinator,
    agents: dict[str, FakeAgent],
    capsys: pytest.CaptureFixture[str],
    job: str = "j",
) -> None:
    a, b = agents["node-a"], agents["node-b"]
    a.hold(job, "m1", {"r0": rand(1, 32), "r1": bytearray(16 * PAGE)}, start=0x10000000)
    b.hold(job, "m2", {"r0": rand(2, 24)}, start=0x20000000)
    for m, node in (("m1", "node-a"), ("m2", "node-b")):
        assert (
            cli(c, capsys, "attach", "--job", job, "--member", m, "--pid", "42", "--node", node)[0]
            == 0
        )
