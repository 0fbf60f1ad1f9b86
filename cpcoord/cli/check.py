"""`cpcoord check`: which change trackers this kernel supports, and why not (like `criu check`).

Runs every backend's self-test on a page of this process (nodeagent.trackers.probe) and
prints one line per backend, or the whole report as JSON. Exits 0 when at least one
kernel-assisted tracker (soft-dirty, uffd-wp) works; otherwise NoKernelTracker (42),
after printing the report: `hash` always works but reads every present page.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cpcoord.errors import NoKernelTracker

NAME = "check"
HELP = "show which change trackers this kernel supports, and why not"
DESCRIPTION = """\
Probe every tracker backend on this kernel by trying it on a page of this process:
  soft-dirty  clear_refs 4 + pagemap bit 55 (CONFIG_MEM_SOFT_DIRTY)
  uffd-wp     userfaultfd async write-protect + PAGEMAP_SCAN (Linux >= 6.7)
  hash        per-page digests: always works, reads every present page
  full        every page, every time: always works
Exit status 0 when soft-dirty or uffd-wp works, 42 when neither does."""
EPILOG = """\
examples:
  cpcoord check                 # one line per tracker
  cpcoord check -v              # and every check behind each verdict
  cpcoord check --json | jq '.trackers[] | select(.available) | .name'"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="list the checks behind each verdict"
    )


def run(args: argparse.Namespace) -> int:
    # Imported here: `cpcoord --help` must not pay for NumPy and the probes.
    from nodeagent.trackers.probe import kernel_assisted, probe_all

    reports = probe_all()
    usable = kernel_assisted(reports)
    uname = os.uname()
    if args.json:
        doc = {
            "kernel": uname.release,
            "machine": uname.machine,
            "ok": bool(usable),
            "kernel_assisted": usable,
            "trackers": [r.to_json() for r in reports],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(f"kernel {uname.release} ({uname.machine})")
        width = max(len(r.name) for r in reports)
        for r in reports:
            verdict = "yes" if r.available else "no "
            print(f"  {r.name:<{width}}  {verdict}  {r.reason}")
            if args.verbose:
                for c in r.checks:
                    mark = "ok  " if c.ok else "FAIL"
                    detail = f": {c.detail}" if c.detail else ""
                    print(f"      [{mark}] {c.what}{detail}")
        if usable:
            print(f"Looks good: incremental captures can use {', '.join(usable)}.")
    sys.stdout.flush()
    if not usable:
        why = "; ".join(f"{r.name}: {r.reason}" for r in reports if r.kernel_assisted)
        raise NoKernelTracker(why)
    return 0
