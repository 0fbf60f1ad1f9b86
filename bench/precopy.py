"""Pre-copy: the frozen time of a full capture while the member keeps writing, with
pre-copy on and off.

    python -m bench.precopy [--size-mib 1024] [--reps 3] [--rates 0.01,0.1,0.5]

A C target (tests/helpers/c/uffd_target.c, built with gcc) maps SIZE MiB of private
anonymous memory, writes every page, then runs a writer thread that writes RATE of its
pages per second (100 batches a second, pages picked at random) during the whole run.
Per rate and repetition, a fresh TrackedCapture (uffd-wp) takes the member's first
capture, which is full:

- *off*: freeze, copy every page, arm the tracker, thaw (what a full capture does without
  pre-copy);
- *on* (nodeagent/capture/precopy.py): arm in a short freeze, copy every page while the
  target runs, up to 5 live passes while the written set shrinks, then freeze and copy
  only what was written since.

frozen = the cut's freeze (seize of the first thread to detach of the last); pauses =
the short freezes of the live passes (arm, collects), listed apart; rounds = live passes;
frozen pages = pages still copied at the cut. Exact: once per rate, the pre-copied
capture and a plain full capture are taken in the same freeze, the pre-copied one is
written as an image and read back, and the bytes must be equal.

Goal (issue 16): frozen <= 50 ms at 1%/s for 1 GiB (a full capture was ~260 ms).
Writes bench/results/precopy.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Stats, write_results
from cpcoord.image import load_image, region_bytes
from cpcoord.image_writer import ImageWriter
from cpcoord.ranges import AddressRange
from nodeagent.capture import precopy
from nodeagent.capture.incremental import TrackedCapture
from nodeagent.capture.process import capture
from nodeagent.proc.freeze import frozen
from nodeagent.proc.procfs import ProcessIdentity
from nodeagent.trackers import registry

REPO = Path(__file__).resolve().parents[1]
C_SOURCE = REPO / "tests/helpers/c/uffd_target.c"
GOAL_FROZEN_MS = 50.0
PAGE = 4096


class RateTarget:
    """The C target in `mem` mode with one region and its rate writer."""

    def __init__(self, exe: Path, pages: int) -> None:
        self.proc = subprocess.Popen(
            [str(exe), "mem", str(pages)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.pages = pages
        assert self.proc.stdout is not None
        self.addr = int(self.proc.stdout.readline().split()[1], 16)
        assert self.proc.stdout.readline().split()[0] == "ready"
        self.ident = ProcessIdentity.of(self.proc.pid)
        self.range = AddressRange(self.addr, self.addr + pages * PAGE)

    def cmd(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply.startswith("ok"):
            raise RuntimeError(f"target: {line!r} -> {reply!r}")
        return reply

    def rate(self, per_sec: int) -> None:
        self.cmd(f"R {self.addr:x} {self.pages} {per_sec}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _forget(tc: TrackedCapture) -> None:
    with frozen(tc.ident) as fp:
        tc.forget(fp)


def _one(t: RateTarget, on: bool) -> dict[str, Any]:
    tc = TrackedCapture(t.ident, [t.range], "uffd-wp")
    t0 = time.perf_counter()
    res = tc.capture(precopy=precopy.Limits() if on else None)
    wall = time.perf_counter() - t0
    tc.commit()
    cap = res.capture
    if not res.full or cap.pages != t.pages:
        raise RuntimeError(f"not a full capture: {res.reason}, {cap.pages} pages")
    pc = cap.precopy
    if on and (pc is None or pc.fallback):
        raise RuntimeError(f"pre-copy did not apply: {pc}")
    out = {
        "frozen": cap.timings.frozen,
        "wall": wall,
        "pauses": sum(p.pause_seconds for p in pc.passes) if pc else 0.0,
        "rounds": pc.rounds if pc else 0,
        "frozen_pages": pc.frozen_pages if pc else cap.pages,
        "live_bytes": [p.nbytes for p in pc.passes] if pc else [],
    }
    _forget(tc)
    return out


def _exact(t: RateTarget, work: Path) -> bool:
    """Pre-copied capture and a plain full one in the same freeze; the pre-copied one
    written as an image and read back: the same bytes."""
    tc = TrackedCapture(t.ident, [t.range], "uffd-wp")
    if tc.precopy(precopy.Limits()) is None:
        raise RuntimeError("pre-copy did not apply")
    with frozen(t.ident) as fp:
        res = tc.capture(fp=fp)
        ref = capture(t.ident, [t.range], fp=fp)
    tc.commit()
    (r,) = res.capture.regions
    (w,) = ref.regions
    out = work / "img"
    wr = ImageWriter(out)
    wr.add_member("m", t.ident.pid, t.ident.start_time)
    wr.add_region(
        "m", t.ident.pid, t.ident.start_time, r.name, r.start, r.end, r.pages, r.data, r.zero
    )
    wr.commit()
    got = region_bytes(load_image(out), "m", r.name)
    same = bool(np.array_equal(np.asarray(got)[w.pages.astype(np.int64)], w.data))
    same = same and np.array_equal(r.pages, w.pages)
    shutil.rmtree(out)
    _forget(tc)
    return same


def _ms(xs: list[float]) -> tuple[float, str]:
    s = Stats.of(xs)
    return s.median * 1e3, f"{s.min * 1e3:.1f}-{s.max * 1e3:.1f}"


def bench_rate(exe: Path, pages: int, rate: float, reps: int, work: Path) -> list[dict[str, Any]]:
    t = RateTarget(exe, pages)
    rows = []
    try:
        t.rate(max(1, int(pages * rate)))
        time.sleep(0.2)
        exact = _exact(t, work)
        for on in (False, True):
            runs = [_one(t, on) for _ in range(reps)]
            f, fr = _ms([r["frozen"] for r in runs])
            rows.append(
                {
                    "written/s": f"{rate * 100:g}%",
                    "pre-copy": "on" if on else "off",
                    "frozen ms": f,
                    "frozen min-max": fr,
                    "pauses ms": _ms([r["pauses"] for r in runs])[0],
                    "rounds": sorted(r["rounds"] for r in runs)[reps // 2],
                    "frozen pages": sorted(r["frozen_pages"] for r in runs)[reps // 2],
                    "live MiB per pass": " / ".join(
                        f"{b / 2**20:.1f}" for b in runs[reps // 2]["live_bytes"]
                    )
                    or "-",
                    "wall s": _ms([r["wall"] for r in runs])[0] / 1e3,
                    "exact": ("yes" if exact else "NO") if on else "",
                    "frozen_samples": [r["frozen"] for r in runs],
                }
            )
        t.rate(0)
    finally:
        t.close()
    return rows


def plot(rows: list[dict[str, Any]]) -> Any:
    def draw(fig: Any) -> None:
        ax = fig.subplots(1, 1)
        rates = list(dict.fromkeys(r["written/s"] for r in rows))
        xs = np.arange(len(rates))
        for k, mode in enumerate(("off", "on")):
            ys = [
                next(r["frozen ms"] for r in rows if r["written/s"] == x and r["pre-copy"] == mode)
                for x in rates
            ]
            ax.bar(xs + (k - 0.5) * 0.38, ys, 0.38, label=f"pre-copy {mode}")
        ax.axhline(GOAL_FROZEN_MS, color="k", ls=":", lw=1, label="goal at 1%/s")
        ax.set_xticks(xs, [f"{x}/s" for x in rates])
        ax.set_xlabel("pages written per second (% of the member)")
        ax.set_ylabel("frozen at the cut (ms, median)")
        ax.set_title("full capture of a member that keeps writing")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)

    return draw


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rates", default="0.01,0.1,0.5")
    args = p.parse_args()
    if shutil.which("gcc") is None:
        raise SystemExit("gcc is needed to build the C target")
    avail = registry.availability("uffd-wp")
    if not avail.available:
        raise SystemExit(f"uffd-wp is needed: {avail.reason}")
    rates = [float(x) for x in args.rates.split(",")]
    pages = args.size_mib * (1 << 20) // PAGE
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "uffd_target"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(C_SOURCE)], check=True)
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else d
        with tempfile.TemporaryDirectory(prefix="cpcoord-bench-pc-", dir=base) as work:
            for rate in rates:
                print(f"-- {rate * 100:g}% of the pages written per second", flush=True)
                rows += bench_rate(exe, pages, rate, args.reps, Path(work))
                for r in rows[-2:]:
                    print(
                        f"   pre-copy {r['pre-copy']:>3}: frozen {r['frozen ms']:.1f} ms, "
                        f"rounds {r['rounds']}, frozen pages {r['frozen pages']}, "
                        f"pauses {r['pauses ms']:.1f} ms {r['exact']}",
                        flush=True,
                    )
    goal = next((r for r in rows if r["written/s"] == "1%" and r["pre-copy"] == "on"), None)
    notes = [
        f"member: {args.size_mib} MiB private anonymous, every page written first; a writer "
        f"thread writes the rate given, 100 batches a second, all along; {args.reps} "
        "repetitions per row (medians; min-max beside); tracker uffd-wp; each capture is "
        "the first of a fresh chain (full)",
        "frozen = the target's downtime at the cut; pauses = the short freezes before it "
        "(arm, and one collect per further live pass), summed; wall = the whole capture "
        "call, live passes included",
        "exact: a pre-copied capture and a plain full capture in the same freeze, the "
        "pre-copied one written as an image and read back, compared byte for byte",
        f"load average before the run: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (shared 2-CPU machine; other "
        "engineers' tests ran meanwhile: numbers are noisy)",
    ]
    if goal is not None:
        ok = goal["frozen ms"] <= GOAL_FROZEN_MS and goal["exact"] == "yes"
        notes.append(
            f"goal at 1%/s: frozen <= {GOAL_FROZEN_MS:.0f} ms and exact: "
            f"{'met' if ok else 'NOT met'} ({goal['frozen ms']:.1f} ms)"
        )
    cols = [
        "written/s",
        "pre-copy",
        "frozen ms",
        "frozen min-max",
        "pauses ms",
        "rounds",
        "frozen pages",
        "live MiB per pass",
        "wall s",
        "exact",
    ]
    for path in write_results(
        "precopy",
        f"Pre-copy: full capture of a {args.size_mib} MiB member that keeps writing",
        cols,
        rows,
        notes=notes,
        extra={"size_mib": args.size_mib, "rates": rates},
        plot=plot(rows),
    ):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
