"""Crash consistency with real process deaths: a child process checkpoints into a store
and dies (os._exit after each commit step, or SIGKILL at a random moment of a busy
ingest loop); the test then opens the store like a restarted coordinator and checks that
no partial generation is visible, every committed one restores exactly, verify passes,
and gc leaves only what is needed. On a local store, or on SeaweedFS S3 with
CPCOORD_TEST_STORE=s3 (tests/helpers/stores.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.stores import StoreArgs
from tests.helpers.store_crash import COMMIT_STEPS, assert_clean, image, open_repo
from tests.helpers.store_support import assert_restores, checkpoint

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def child(code: str, root: Path, where: StoreArgs) -> subprocess.Popen[bytes]:
    prelude = f"""
        import json, os, sys
        from pathlib import Path
        from tests.helpers.store_support import checkpoint, upload, rand
        from tests.helpers.store_crash import image, open_repo
        repo = open_repo(Path({str(root)!r}), json.loads(os.environ["CPCOORD_TEST_CRASH_STORE"]))
    """
    src = textwrap.dedent(prelude) + textwrap.dedent(code)
    env = dict(os.environ, CPCOORD_TEST_CRASH_STORE=json.dumps(where))  # keys not in argv
    return subprocess.Popen([sys.executable, "-c", src], cwd=ROOT, stdout=subprocess.PIPE, env=env)


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_process_dies_after_each_commit_step(
    tmp_path: Path, step: str, store_select: Callable[[Path], StoreArgs]
) -> None:
    root = tmp_path / "store"
    where = store_select(tmp_path)
    p = child(
        f"""
        g1 = checkpoint(repo, "j", image(1))
        m = upload(repo, "j", image(2))
        def die(s):
            if s == {step!r}:
                print(m.generation, flush=True)
                os._exit(137)
        repo.fault = die
        repo.commit(m)
        """,
        root,
        where,
    )
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 137
    g2 = int(out)
    with open_repo(root, where) as repo:
        visible = [g.number for g in repo.generations("j")]
        assert visible == ([1, g2] if step == "catalog" else [1])
        assert_restores(repo, "j", 1, image(1))
        if step == "catalog":
            assert_restores(repo, "j", g2, image(2))
        repo.gc(keep=10)
        assert_clean(repo, keep=1000, one_index=False)
        g3 = checkpoint(repo, "j", image(3))
        assert_restores(repo, "j", g3, image(3))
        assert_clean(repo, keep=1000, one_index=False)


def test_sigkill_at_random_moments_of_a_busy_store(
    tmp_path: Path, store_select: Callable[[Path], StoreArgs]
) -> None:
    root = tmp_path / "store"
    where = store_select(tmp_path)
    rng = random.Random(int(os.environ.get("CPCOORD_TEST_SEED", "7")))
    for round_ in range(4):  # each round reopens what the last one killed
        p = child(
            """
            while True:
                n = repo.begin("j")
                from tests.helpers.store_support import upload as up
                m = up(repo, "j", image(n), generation=n)
                repo.commit(m)
                if n % 3 == 0:
                    repo.gc(keep=2)
                print(n, flush=True)
            """,
            root,
            where,
        )
        assert p.stdout is not None
        first = int(p.stdout.readline())  # committed in this round; now kill it anywhere
        time.sleep(rng.random())
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
        with open_repo(root, where) as repo:
            gens = [g.number for g in repo.generations("j")]
            assert gens and max(gens) >= first, f"round {round_}: lost {first}: {gens}"
            for g in gens:
                assert_restores(repo, "j", g, image(g))
            assert repo.verify().ok
            repo.gc(keep=2)
            assert_clean(repo, keep=1000, one_index=False)
