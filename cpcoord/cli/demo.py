"""`cpcoord demo`: run a coordinator, an agent and a sample job end to end on loopback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

NAME = "demo"
HELP = "run a whole coordinator, agent and sample job on a temporary store"
DESCRIPTION = """\
Start a coordinator and one agent on loopback (plaintext, loopback only), launch a sample
job of two processes that mutate a state region, take a full and two incremental
generations, check every export against what the members held at each cut, roll the
members back in place to the first generation and check them, print a table, and stop
every process it started (also on Ctrl-C)."""
EPILOG = """\
examples:
  cpcoord demo
  cpcoord demo --store /tmp/demo-store --pages 1024"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, help="keep the store here (default: a temp dir)")
    p.add_argument("--pages", type=int, default=256, help="state pages per member")


def run(args: argparse.Namespace) -> int:
    from cpcoord.demo.run import run_demo

    return run_demo(args.store, args.pages, sys.stdout)
