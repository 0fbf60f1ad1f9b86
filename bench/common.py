"""Shared benchmark helpers: repetitions and their statistics, the raw baselines of this
machine measured in the same run (process_vm_readv, /proc/PID/mem, process_vm_writev,
memcpy, file writes), and result files (bench/results/NAME.json, NAME.md table, NAME.png plot).

Baselines copy into/out of prefaulted huge-page buffers (nodeagent.proc.staging.Staging) with
one iovec per run and IOV_MAX iovecs per call: the best this machine does, which is what
cpcoord's numbers are compared against.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from nodeagent.proc.iovec import IOV_MAX
from nodeagent.proc.staging import Staging

RESULTS = Path(__file__).resolve().parent / "results"
# `python -m bench --results-dir DIR` (and its test) redirect every module's output here,
# so a trial run never overwrites the committed results.
RESULTS_ENV = "CPCOORD_BENCH_RESULTS"


def results_dir() -> Path:
    """Where results go: $CPCOORD_BENCH_RESULTS if set, else bench/results."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else RESULTS


_libc = ctypes.CDLL(None, use_errno=True)
_vm = {}
for _name in ("process_vm_readv", "process_vm_writev"):
    _fn = getattr(_libc, _name)
    _fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong]
    _fn.argtypes += [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    _fn.restype = ctypes.c_ssize_t
    _vm[_name] = _fn


@dataclass(frozen=True)
class Stats:
    """Seconds of each repetition."""

    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        return cls(tuple(float(s) for s in samples))

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "samples": self.samples}


def repeat(fn: Callable[[], float | None], reps: int, warmup: int = 0) -> Stats:
    """Run `fn` warmup + reps times; it returns its own seconds, or None to be timed."""
    out: list[float] = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        got = fn()
        dt = time.perf_counter() - t0 if got is None else got
        if i >= warmup:
            out.append(dt)
    return Stats.of(out)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def vm_copy(name: str, pid: int, runs: npt.NDArray[np.uint64], local_addr: int) -> float:
    """One pass of process_vm_readv/writev over remote runs `(n, 2)` [address, length],
    packed back to back at `local_addr`. Returns seconds."""
    fn = _vm[name]
    remote = np.ascontiguousarray(runs, dtype=np.uint64)
    ends = np.cumsum(remote[:, 1])
    local = np.empty_like(remote)
    local[:, 0] = np.uint64(local_addr) + ends - remote[:, 1]
    local[:, 1] = remote[:, 1]
    t0 = time.perf_counter()
    for i in range(0, remote.shape[0], IOV_MAX):
        k = min(IOV_MAX, remote.shape[0] - i)
        want = int(remote[i : i + k, 1].sum())
        got = fn(pid, local[i:].ctypes.data, k, remote[i:].ctypes.data, k, 0)
        if got != want:
            raise OSError(ctypes.get_errno(), f"{name} moved {got} of {want} bytes")
    return time.perf_counter() - t0


def raw_readv(pid: int, runs: npt.NDArray[np.uint64], reps: int, warmup: int = 1) -> Stats:
    """process_vm_readv of the runs into a prefaulted buffer, best case (after `warmup`
    untimed passes)."""
    buf = Staging(int(np.asarray(runs)[:, 1].sum()))
    try:
        return repeat(lambda: vm_copy("process_vm_readv", pid, runs, buf.address), reps, warmup)
    finally:
        buf.close()


def raw_mem(pid: int, runs: npt.NDArray[np.uint64], reps: int) -> Stats:
    """/proc/PID/mem reads of the runs (one preadv each) into a prefaulted buffer: the
    path that takes no pins (what capture uses for pages not exclusively mapped)."""
    remote = np.ascontiguousarray(runs, dtype=np.uint64)
    buf = Staging(int(remote[:, 1].sum()))
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)

    def once() -> float:
        at = buf.address
        t0 = time.perf_counter()
        for addr, length in remote.tolist():
            view = (ctypes.c_char * length).from_address(at)
            if os.preadv(fd, [view], addr) != length:
                raise OSError(f"/proc/{pid}/mem read short at {addr:#x}")
            at += length
        return time.perf_counter() - t0

    try:
        return repeat(once, reps, 1)
    finally:
        os.close(fd)
        buf.close()


def raw_writev(pid: int, runs: npt.NDArray[np.uint64], src: Staging, reps: int) -> Stats:
    """process_vm_writev of `src` (packed) into the runs of the target."""
    return repeat(lambda: vm_copy("process_vm_writev", pid, runs, src.address), reps, 1)


def memcpy(nbytes: int, reps: int) -> Stats:
    """Copy between two prefaulted buffers in this process."""
    a, b = Staging(nbytes), Staging(nbytes)
    try:
        src = a.pages(0, nbytes // 4096).reshape(-1)
        dst = b.pages(0, nbytes // 4096).reshape(-1)
        src[:: 4096 // 8] = 1

        def once() -> None:
            np.copyto(dst, src)

        return repeat(once, reps, 1)
    finally:
        a.close()
        b.close()


def timed_write(directory: Path, view: memoryview, fsync: bool = True) -> float:
    """pwrite `view` into a new file in `directory` (then fsync), remove it: seconds."""
    path = directory / f".cpcoord-bench-{os.getpid()}"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done : done + (1 << 30)], done)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    return dt


def file_write(directory: Path, nbytes: int, reps: int, fsync: bool = True) -> Stats:
    """pwrite `nbytes` of non-zero data from memory into a new file, then fsync."""
    src = Staging(nbytes)
    rows = src.pages(0, nbytes // 4096)
    rows[:, ::512] = 7
    view = rows.reshape(-1).data.cast("B")
    try:
        return repeat(lambda: timed_write(directory, view, fsync), reps)
    finally:
        src.close()


def rate_row(what: str, st: Stats, nbytes: int, raw_gbps: float, **more: Any) -> dict[str, Any]:
    """A results row of a transfer of `nbytes`: times, GB/s and % of the raw limit."""
    return {
        "what": what,
        "MiB": nbytes >> 20,
        "median s": st.median,
        "min s": st.min,
        "max s": st.max,
        "GB/s": gbps(nbytes, st.median),
        "% of raw": 100 * gbps(nbytes, st.median) / raw_gbps,
        **more,
    }


def machine() -> dict[str, Any]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return "?"

    mem = read("/proc/meminfo").splitlines()[0].split()[1:2]
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "mem_kib": int(mem[0]) if mem else 0,
        "thp": read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "load_avg": os.getloadavg(),
    }


def write_results(
    name: str,
    title: str,
    columns: Sequence[str],
    rows: Sequence[dict[str, Any]],
    *,
    notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    plot: Callable[[Any], None] | None = None,
    out_dir: Path | None = None,
) -> list[Path]:
    """Write NAME.json (everything), NAME.md (table + notes) and NAME.png (`plot(fig)`
    draws into a matplotlib Figure, Agg backend) under `out_dir` (default: results_dir()).
    Returns the paths written."""
    out_dir = results_dir() if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine()
    doc = {
        "name": name,
        "title": title,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": info,
        "columns": list(columns),
        "rows": list(rows),
        "notes": list(notes),
        "extra": extra or {},
    }
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    paths[0].write_text(json.dumps(doc, indent=1, default=float) + "\n")
    lines = [
        f"# {title}",
        "",
        f"{doc['created']} · kernel {info['kernel']} · {info['cpus']} CPUs · "
        f"{info['mem_kib'] // 1024} MiB RAM · THP {info['thp']} · "
        f"load {', '.join(f'{x:.2f}' for x in info['load_avg'])}",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    paths[1].write_text("\n".join(lines) + "\n")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 6), dpi=110)
        plot(fig)
        fig.tight_layout()
        png = out_dir / f"{name}.png"
        fig.savefig(png)
        paths.append(png)
    return paths


def publish(
    name: str,
    title: str,
    rows: Sequence[dict[str, Any]],
    *,
    notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    plot: Callable[[Any], None] | None = None,
) -> int:
    """write_results with the first row's keys as columns, print what was written; a
    module's `main` returns this (exit code 0)."""
    for path in write_results(
        name, title, list(rows[0]), rows, notes=notes, extra=extra, plot=plot
    ):
        print(path)
    return 0


def load_note(load_start: Sequence[float], sharers: str) -> str:
    """The notes' line on the machine's load over a run, and who shared its CPUs."""
    return (
        f"Load average (1, 5, 15 min) at the start {', '.join(f'{x:.2f}' for x in load_start)}"
        f"; at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}; the machine has "
        f"{os.cpu_count()} CPUs shared by {sharers}."
    )


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
