"""The `cpcoord` command: argument parsing, dispatch, and error → exit code conversion.

One module per subcommand (litestream style); each exposes NAME, HELP, `add_arguments`
and `run(args) -> int`. Only `main` turns a CpcoordError into a message and exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from cpcoord import __version__, config
from cpcoord import log as cplog
from cpcoord.errors import CpcoordError

log = logging.getLogger(__name__)

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
    "run",
    "slurm",
    "checkpoint",
    "generations",
    "export",
    "diff",
    "restore",
    "verify",
    "gc",
    "forget",
    "certs",
    "completion",
]


def _load(name: str) -> ModuleType:
    return importlib.import_module(f"cpcoord.cli.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with `only`, the global options and that one subcommand
    (`main` runs a command this way: importing every subcommand module costs a command
    like `capture` a third of its start-up, gRPC among them)."""
    parser = argparse.ArgumentParser(
        prog="cpcoord",
        description="Distributed checkpoint coordinator for Linux processes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: see docs/exit-codes.md. `cpcoord COMMAND --help` for examples.",
    )
    parser.add_argument("--version", action="version", version=f"cpcoord {__version__}")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML config file (default: $CPCOORD_CONFIG, ~/.config/cpcoord/config.toml, "
        "/etc/cpcoord/config.toml; see docs/config.md)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS if only is None else [only]:
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


def _pre_parse(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """(--config, the subcommand's name) given before the subcommand (global options),
    without parsing the rest: the file's values must be defaults before the real parse,
    and only the named subcommand's module need be imported."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--log-level", default=None)
    pre.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        known, _ = pre.parse_known_args(argv)
    except argparse.ArgumentError:
        return None, None  # e.g. `--config` without a value: the real parse reports it
    rest = known.rest
    command = rest[0] if rest and rest[0] in SUBCOMMANDS else None
    return known.config, command


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path, command = _pre_parse(argv)
    try:
        cfg = config.load(config_path)
        # The whole parser when the file has a table for another subcommand: its keys
        # are checked against that subcommand's options (an error names them).
        if command is not None and set(cfg.sections) - {command}:
            command = None
        parser = build_parser(command)
        config.apply(parser, cfg)
    except CpcoordError as e:
        print(f"cpcoord: error: {e.message()}", file=sys.stderr)
        return e.exit_code
    args = parser.parse_args(argv)
    cplog.setup(args.log_level)
    if cfg.path is not None:
        log.debug("config file loaded", extra={"fields": config.describe(cfg)})
    for w in cfg.warnings:
        log.warning(w, extra={"fields": {"path": str(cfg.path)}})
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
