"""The machine's own limits, measured in the same run as the benchmarks that compare to them.

    python -m bench.limits [--size-mib 1024] [--reps 5]

- raw `process_vm_readv`: SIZE MiB of a target process's resident random pages into a
  prefaulted buffer, one iovec per run, IOV_MAX iovecs per call (bench/common.py);
- raw `process_vm_writev`: the same bytes back into the target;
- memcpy: SIZE MiB between two prefaulted buffers of one process;
- raw gRPC streaming on loopback: a generic-handler server (its own process, as the
  coordinator is) on 127.0.0.1:0 receiving a client stream of SIZE MiB in 1 MiB and
  4 MiB `bytes` messages, with explicit max message sizes on both sides, no protobuf.

cpcoord cannot beat these: capture is bounded by readv, restore by writev, an upload by
the gRPC stream. Every row: median of REPS repetitions (after one warm-up), min and max.
Writes bench/results/limits.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.common import Stats, gbps, memcpy, raw_readv, raw_writev, repeat, write_results
from nodeagent.proc.staging import Staging

REPO = Path(__file__).resolve().parents[1]
SERVICE, METHOD = "bench.Limits", "Sink"
MSG_SIZES = (1 << 20, 4 << 20)
PAGE = 4096


@dataclass(frozen=True)
class Limit:
    """One raw rate of this machine: `nbytes` moved per repetition, `stats` in seconds."""

    key: str  # readv, writev, memcpy, grpc-1MiB, grpc-4MiB
    what: str
    nbytes: int
    stats: Stats

    @property
    def gbps(self) -> float:
        return gbps(self.nbytes, self.stats.median)

    def row(self) -> dict[str, Any]:
        return {
            "limit": self.key,
            "what": self.what,
            "MiB": self.nbytes >> 20,
            "median s": self.stats.median,
            "min s": self.stats.min,
            "max s": self.stats.max,
            "GB/s": self.gbps,
            "GB/s min-max": f"{gbps(self.nbytes, self.stats.max):.2f}-"
            f"{gbps(self.nbytes, self.stats.min):.2f}",
        }


# -- process_vm_readv / process_vm_writev / memcpy ------------------------------------------


def vm_limits(size: int, reps: int) -> list[Limit]:
    """readv and writev of `size` bytes of a target's resident random pages."""
    from testbed.driver import Target  # the test target; imported only when measuring

    target = Target(maps=[f"data:{size // PAGE}:anon:random:3"], timeout=600)
    src = Staging(size)
    try:
        m = target.mapping("data")
        runs = np.array([[m.addr, size]], dtype=np.uint64)
        rd = raw_readv(target.pid, runs, reps)
        src.pages(0, size // PAGE)[:, ::512] = 0x5A  # non-zero, like real pages
        wr = raw_writev(target.pid, runs, src, reps)
        target.assert_running()
    finally:
        src.close()
        target.close()
    return [
        Limit("readv", "raw process_vm_readv (target -> prefaulted buffer)", size, rd),
        Limit("writev", "raw process_vm_writev (prefaulted buffer -> target)", size, wr),
    ]


# -- raw gRPC streaming ---------------------------------------------------------------------


def _options(max_bytes: int) -> list[tuple[str, int]]:
    # Explicit on both ends: gRPC's default receive limit (4 MiB) would refuse a 4 MiB
    # message plus its framing.
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


def _sink(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    n = 0
    for msg in requests:
        n += len(msg)
    return str(n).encode()


def serve(port_file: Path, max_bytes: int) -> None:
    """`python -m bench.limits --grpc-server FILE`: serve the sink until killed."""
    server = grpc.server(futures.ThreadPoolExecutor(2), options=_options(max_bytes))
    handler = grpc.stream_unary_rpc_method_handler(_sink)  # no (de)serializers: raw bytes
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.rename(port_file)  # the client never reads a half-written port
    server.wait_for_termination()


def grpc_limits(size: int, reps: int, msg_sizes: tuple[int, ...] = MSG_SIZES) -> list[Limit]:
    """Stream `size` bytes in messages of each size to a sink server in another process."""
    max_bytes = max(msg_sizes) + (1 << 20)
    out: list[Limit] = []
    with tempfile.TemporaryDirectory(prefix="cpcoord-limits-") as d:
        port_file = Path(d) / "port"
        argv = [sys.executable, "-m", "bench.limits", "--grpc-server", str(port_file)]
        argv += ["--max-bytes", str(max_bytes)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen(argv, cwd=REPO, env=env)
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"raw gRPC server did not start (exit {proc.poll()})")
                time.sleep(0.05)
            addr = f"127.0.0.1:{port_file.read_text().strip()}"
            with grpc.insecure_channel(addr, options=_options(max_bytes)) as ch:
                grpc.channel_ready_future(ch).result(timeout=30)
                call = ch.stream_unary(f"/{SERVICE}/{METHOD}", None, None)  # raw bytes
                for msg in msg_sizes:
                    payload = np.random.default_rng(5).bytes(msg)
                    count = max(1, size // msg)

                    def once(payload: bytes = payload, count: int = count) -> None:
                        got = call(iter([payload] * count), timeout=600)
                        if int(got) != count * len(payload):
                            raise RuntimeError(f"sink got {got!r} of {count * len(payload)}")

                    st = repeat(once, reps, warmup=1)
                    what = f"raw gRPC client stream on loopback, {msg >> 20} MiB messages"
                    out.append(Limit(f"grpc-{msg >> 20}MiB", what, count * msg, st))
        finally:
            proc.kill()
            proc.wait()
    return out


# -- all of them ------------------------------------------------------------------------------


def measure(size: int, reps: int) -> list[Limit]:
    limits = vm_limits(size, reps)
    limits.append(
        Limit("memcpy", "memcpy between two buffers of one process", size, memcpy(size, reps))
    )
    limits += grpc_limits(size, reps)
    return limits


def load(out_dir: Path) -> dict[str, float]:
    """GB/s (median) per limit key from a limits.json written by this module; {} if none."""
    import json

    path = out_dir / "limits.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {str(r["limit"]): float(r["GB/s"]) for r in rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--grpc-server", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--max-bytes", type=int, default=8 << 20, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.grpc_server:
        serve(args.grpc_server, args.max_bytes)
        return 0
    size = args.size_mib << 20
    load_before = os.getloadavg()
    limits = measure(size, args.reps)
    rows = [lim.row() for lim in limits]
    notes = [
        f"{args.reps} repetitions after one warm-up each; GB/s from the median time, "
        "min-max from the slowest and fastest repetition.",
        "readv/writev: one iovec for the whole mapping (4 KiB pages, resident, random "
        "content), local buffer prefaulted; the best case of what capture and restore do.",
        "gRPC: grpcio, insecure channel on 127.0.0.1, server in a separate Python process "
        "with a generic stream-unary handler that only counts bytes; messages are raw "
        "`bytes` (no protobuf); the best case of an agent's upload stream.",
        f"Load average before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs, shared).",
    ]

    def plot(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        y = np.arange(len(limits))
        med = np.array([lim.gbps for lim in limits])
        lo = med - np.array([gbps(lim.nbytes, lim.stats.max) for lim in limits])
        hi = np.array([gbps(lim.nbytes, lim.stats.min) for lim in limits]) - med
        ax.barh(y, med, xerr=[lo, hi], color="#888", capsize=3)
        ax.set_yticks(y, [lim.what for lim in limits], fontsize=8)
        ax.invert_yaxis()
        for i, v in enumerate(med):
            ax.text(v, i, f"  {v:.2f}", va="bottom", fontsize=8)
        ax.set_xlabel("GB/s (median; bars: min-max)")
        ax.set_title(f"Limits of this machine, {args.size_mib} MiB per repetition")

    cols = ["limit", "what", "MiB", "median s", "min s", "max s", "GB/s", "GB/s min-max"]
    paths = write_results(
        "limits",
        "Raw limits of this machine",
        cols,
        rows,
        notes=notes,
        plot=plot,
        extra={lim.key: lim.stats.as_dict() for lim in limits},
    )
    print(paths[1].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
