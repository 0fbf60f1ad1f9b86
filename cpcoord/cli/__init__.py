"""The `cpcoord` command: argument parsing, dispatch, and error → exit code conversion.

One module per subcommand (litestream style); each exposes NAME, HELP, `add_arguments`
and `run(args) -> int`. Only `main` turns a CpcoordError into a message and exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from cpcoord import __version__
from cpcoord import log as cplog
from cpcoord.errors import CpcoordError

# Subcommand modules, in the order --help lists them.
SUBCOMMANDS = [
    "demo",
    "capture",
    "check",
    "image",
    "coordinator",
    "agent",
    "jobs",
    "attach",
    "detach",
    "checkpoint",
    "generations",
    "export",
    "diff",
    "restore",
    "verify",
    "gc",
    "certs",
]


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"cpcoord.cli.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpcoord",
        description="Distributed checkpoint coordinator for Linux processes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: see docs/exit-codes.md. `cpcoord COMMAND --help` for examples.",
    )
    parser.add_argument("--version", action="version", version=f"cpcoord {__version__}")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        try:
            mod = _load(name)
        except ModuleNotFoundError as e:
            # Listed before its module exists (subcommands land one by one); any other
            # missing import is a real error.
            if e.name != f"cpcoord.cli.{name}":
                raise
            continue
        p = sub.add_parser(
            mod.NAME,
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            epilog=getattr(mod, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cplog.setup(args.log_level)
    try:
        return int(args._run(args))
    except CpcoordError as e:
        print(f"cpcoord: error: {e.message()}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cpcoord: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
