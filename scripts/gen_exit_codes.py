"""Regenerate docs/exit-codes.md from cpcoord/errors.py (tests/unit/test_errors.py checks it)."""

from __future__ import annotations

from pathlib import Path

from cpcoord import errors

HEAD = """# Exit codes

Every error of cpcoord is a class in `cpcoord/errors.py`; its docstring is the message and it
carries the exit code of the CLI and the gRPC status a servicer answers with. This table is
made by `python scripts/gen_exit_codes.py` and checked by `tests/unit/test_errors.py`.

| code | meaning |
| --- | --- |
| 0 | success |
| 1 | unexpected error (a bug: please report it with the log) |
| 2 | usage error (bad command line) |
| 130 | interrupted (Ctrl-C) |
"""


def _all(cls: type[errors.CpcoordError]) -> list[type[errors.CpcoordError]]:
    out: list[type[errors.CpcoordError]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_all(sub)]
    return out


def main() -> None:
    rows = []
    for c in sorted(set(_all(errors.CpcoordError)), key=lambda c: c.exit_code):
        msg = (c.__doc__ or "").strip().splitlines()[0]
        msg = msg.replace("{!r}", "…").replace("{}", "…").replace("|", "\\|")
        rows.append(f"| {c.exit_code} | `{c.__name__}`: {msg} (gRPC {c.status}) |")
    out = Path(__file__).resolve().parents[1] / "docs" / "exit-codes.md"
    out.write_text(HEAD + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
