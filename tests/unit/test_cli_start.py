"""The CLI builds only the parser of the subcommand it runs: a command like `capture`
imports neither gRPC nor the other subcommands' modules (a third of its start-up), and
keeps every rule of the whole parser: config tables of other subcommands are still
checked, `--help` and unknown commands still list everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from testbed.driver import REPO

PROBE = """
import json, sys
from cpcoord import cli
code = cli.main(sys.argv[1:])
mods = [m for m in sys.modules if m == "grpc" or m.startswith(("grpc.", "cpcoord.cli."))]
print(json.dumps({"code": code, "modules": sorted(mods)}))
"""


def run(tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> dict[str, object]:
    e = dict(os.environ, PYTHONPATH=str(REPO), XDG_CONFIG_HOME=str(tmp_path))  # no user file
    e.pop("CPCOORD_CONFIG", None)
    e.update(env or {})
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=e,
        timeout=60,
    )
    out: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    out["stderr"] = res.stderr
    return out


def test_capture_imports_only_its_own_module(tmp_path: Path) -> None:
    got = run(tmp_path, "capture", "--pid", "999999999", "--out", str(tmp_path / "img"))
    assert got["code"] == 10, got["stderr"]  # NoSuchProcess, from the capture command
    assert got["modules"] == ["cpcoord.cli.capture"], got["modules"]


def test_a_config_table_of_another_subcommand_is_still_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[checkpoint]\nno_such_option = 1\n")
    cfg.chmod(0o600)
    got = run(tmp_path, "--config", str(cfg), "capture", "--pid", "1", "--out", str(tmp_path / "i"))
    assert got["code"] != 0 and "checkpoint.no_such_option" in str(got["stderr"])
