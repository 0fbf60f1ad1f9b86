"""The whole `cpcoord capture` command (bench/capture.py's CLI rows): in process
(cli.main) and as a subprocess (interpreter start included, byte code cached as after
`pip install`), to tmpfs and to the disk (durable: fsynced), each interleaved with the
raw limit of that filesystem: raw readv + a raw write of the same bytes into a new file
there (+ fsync on disk), best of the runs of each.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Stats, timed_write, vm_copy
from cpcoord import cli
from nodeagent.proc.staging import Staging
from testbed.daemons import REPO

GOAL_VS_LIMIT = 1.5  # `cpcoord capture` / (raw readv + raw write [+ fsync]), at most


def _installed_env(pycache: Path) -> dict[str, str]:
    """The subprocess's environment, like an installed cpcoord: byte code cached (pip
    compiles it at install; with PYTHONDONTWRITEBYTECODE every run would compile every
    module it imports, ~0.1 s here)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONPYCACHEPREFIX=str(pycache))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _interpreter(env: dict[str, str], reps: int) -> dict[str, Any]:
    """What any Python command pays on this machine before it does anything: the
    interpreter with its site hooks, and importing NumPy (best of `reps`)."""
    out = {}
    for what, code in (("python", "pass"), ("python + numpy", "import numpy")):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, check=True)
            times.append(time.perf_counter() - t0)
        out[what] = Stats.of(times).as_dict()
    return out


def _cli_subprocess(
    pid: int, rng: str, out: Path, env: dict[str, str]
) -> tuple[float, dict[str, Any]]:
    argv = [sys.executable, "-m", "cpcoord", "capture", "--pid", str(pid)]
    argv += ["--range", rng, "--out", str(out), "--json"]
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"cpcoord capture failed: {res.stderr.strip()}")
    summary: dict[str, Any] = json.loads(res.stdout)
    return dt, summary


def _cli_inprocess(pid: int, rng: str, out: Path) -> float:
    sink = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sink):
        code = cli.main(["capture", "--pid", str(pid), "--range", rng, "--out", str(out), "--json"])
    dt = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"cpcoord capture exited {code}")
    return dt


def _med(extra: dict[str, Any], label: str, phase: str) -> float:
    return float(Stats.of(extra[f"cli_{label}"][f"subprocess_{phase}"]["samples"]).median)


def measure_cli(
    pid: int,
    runs: np.ndarray,
    rng_text: str,
    raw: Stats,
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    row: Callable[..., dict[str, Any]],
    extra: dict[str, Any],
) -> tuple[dict[str, Stats], dict[str, float], list[float]]:
    """The command's rows on each filesystem, appended to `rows` and `extra`. Returns
    (stats per row, raw limit per filesystem, every raw readv time)."""
    size = int(runs[:, 1].sum())
    pages = size // 4096
    cli_rows: dict[str, Stats] = {}
    limits: dict[str, float] = {}
    pycache = Path(tempfile.mkdtemp(prefix="cpcoord-bench-pyc-"))
    env = _installed_env(pycache)
    # The source of the raw writes: non-zero, prefaulted once (never a cold buffer).
    src = Staging(size)
    src.pages(0, pages)[:, ::512] = 7
    view = src.pages(0, pages).reshape(-1).data.cast("B")
    rbuf = Staging(size)
    readv_s = list(raw.samples)
    cli_dirs = () if args.no_cli else (("tmpfs", args.tmpfs_dir), ("disk, fsync", args.disk_dir))
    for label, base in cli_dirs:
        work = Path(tempfile.mkdtemp(prefix="cpcoord-bench-", dir=base))
        try:
            # A first run compiles the byte code into the cache (as pip would have).
            _cli_subprocess(pid, rng_text, work / "warm", env)
            shutil.rmtree(work / "warm")
            if "interpreter" not in extra:
                extra["interpreter"] = _interpreter(env, args.reps)
            inproc, sub, phases, writes = [], [], [], []
            for i in range(args.reps):
                # Interleaved, so that load on the machine hits limit and command alike.
                readv_s.append(vm_copy("process_vm_readv", pid, runs, rbuf.address))
                writes.append(timed_write(work, view, fsync=label != "tmpfs"))
                out = work / f"in{i}"
                inproc.append(_cli_inprocess(pid, rng_text, out))
                shutil.rmtree(out)
                out = work / f"sub{i}"
                dt, summary = _cli_subprocess(pid, rng_text, out, env)
                sub.append(dt)
                summary["wall_s"] = dt
                phases.append(summary)
                shutil.rmtree(out)
                gc.collect()
            limit = min(readv_s) + min(writes)
            limits[label] = limit
            cli_rows[f"in-process {label}"] = Stats.of(inproc)
            cli_rows[f"subprocess {label}"] = Stats.of(sub)
            extra[f"cli_{label}"] = {
                "in_process": Stats.of(inproc).as_dict(),
                "subprocess": Stats.of(sub).as_dict(),
                "tracker": phases[0]["tracker"],
            }
            for k in ("frozen_s", "capture_s", "write_s", "total_s"):
                extra[f"cli_{label}"][f"subprocess_{k[:-2]}"] = Stats.of(
                    [ph[k] for ph in phases]
                ).as_dict()
            # Interpreter start, imports, argument checks and exit: wall minus run().
            extra[f"cli_{label}"]["subprocess_startup"] = Stats.of(
                [ph["wall_s"] - ph["total_s"] for ph in phases]
            ).as_dict()
            extra[f"file_write_{label}"] = Stats.of(writes).as_dict()
            extra[f"limit_{label}"] = limit
            for how in ("in-process", "subprocess"):
                st = cli_rows[f"{how} {label}"]
                rows.append(row(f"`cpcoord capture`, image on {label}, {how}", st))
                rows[-1]["x limit"] = st.median / limit
            rows.append(
                row(
                    f"baseline: write {args.size_mib} MiB file on {label} (best)",
                    Stats.of([min(writes)]),
                )
            )
            rows.append(
                row(f"limit on {label}: raw readv + write (best of each)", Stats.of([limit]))
            )
            rows[-1]["x limit"] = 1.0
        finally:
            shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(pycache, ignore_errors=True)
    src.close()
    rbuf.close()
    return cli_rows, limits, readv_s


def _ok(b: bool) -> str:
    return "met" if b else "NOT met"


def cli_notes(
    limits: dict[str, float],
    cli_rows: dict[str, Stats],
    verdict: dict[str, Any],
    extra: dict[str, Any],
    reps: int,
    raw_reps: int,
) -> list[str]:
    """The results' note on each filesystem: the command against its raw limit."""
    return [
        f"Goal `cpcoord capture` <= {GOAL_VS_LIMIT}x the raw limit on {label} "
        f"(raw readv + write{'' if label == 'tmpfs' else ' + fsync'}, best of "
        f"{reps + raw_reps} and {reps}: {limit:.3f} s): median "
        f"subprocess {cli_rows[f'subprocess {label}'].median:.3f} s = "
        f"{verdict[f'cli_subprocess_vs_limit_{label}']:.2f}x "
        f"({_ok(verdict[f'cli_subprocess_vs_limit_{label}'] <= GOAL_VS_LIMIT)}), "
        f"in-process {verdict[f'cli_in_process_vs_limit_{label}']:.2f}x "
        f"({_ok(verdict[f'cli_in_process_vs_limit_{label}'] <= GOAL_VS_LIMIT)}); "
        f"subprocess phases (median): start-up {_med(extra, label, 'startup'):.3f} s, "
        f"capture {_med(extra, label, 'capture'):.3f} s (frozen "
        f"{_med(extra, label, 'frozen'):.3f}), write {_med(extra, label, 'write'):.3f} s."
        for label, limit in limits.items()
    ]


def interpreter_note(extra: dict[str, Any], reps: int) -> str:
    """What any Python command pays here before it does anything (if measured)."""
    if "interpreter" not in extra:
        return ""
    return (
        f"Interpreter start on this machine (best of {reps}): `python -c pass` "
        f"{min(extra['interpreter']['python']['samples']):.3f} s, `python -c 'import "
        f"numpy'` {min(extra['interpreter']['python + numpy']['samples']):.3f} s: part of "
        "every subprocess row, beyond what cpcoord can change."
    )
