"""`cpcoord completion bash|zsh|fish`: the scripts, generated from the argparse tree, run
in the real shells and complete subcommands, options and option values."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpcoord.cli import SUBCOMMANDS, build_parser
from cpcoord.cli.completion import model
from tests.conftest import require

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def script(shell: str, tmp_path: Path) -> Path:
    r = subprocess.run(
        [sys.executable, "-m", "cpcoord", "completion", shell],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert r.stderr == ""
    p = tmp_path / f"cpcoord.{shell}"
    p.write_text(r.stdout)
    return p


def bash_complete(path: Path, *words: str) -> list[str]:
    """COMPREPLY after <TAB> with the cursor at the end of the last word."""
    words_q = " ".join(f"'{w}'" for w in words)
    prog = (
        f"source '{path}' && COMP_WORDS=({words_q}) && COMP_CWORD={len(words) - 1} "
        '&& _cpcoord && printf "%s\\n" "${COMPREPLY[@]}"'
    )
    r = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", prog],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=path.parent,
    )
    assert r.returncode == 0, r.stderr
    return sorted(x for x in r.stdout.splitlines() if x)


def test_bash_completes_subcommands_options_and_values(tmp_path: Path) -> None:
    require(shutil.which("bash") is not None, "bash")
    p = script("bash", tmp_path)
    assert subprocess.run(["bash", "-n", str(p)], timeout=30).returncode == 0
    assert bash_complete(p, "cpcoord", "chec") == ["check", "checkpoint"]
    assert bash_complete(p, "cpcoord", "checkpoint", "--j") == ["--job", "--json"]
    # global options before the subcommand, values of options skipped over
    assert bash_complete(p, "cpcoord", "--log-level", "debug", "restore", "--gen") == [
        "--generation"
    ]
    assert bash_complete(p, "cpcoord", "--con") == ["--config"]
    # choices of an option, and file names for a path-valued one
    assert bash_complete(p, "cpcoord", "agent", "--compress", "") == ["auto", "none", "zstd"]
    (tmp_path / "store-dir").mkdir()
    assert bash_complete(p, "cpcoord", "demo", "--store", "store-") == ["store-dir"]
    # nested actions and their options
    assert bash_complete(p, "cpcoord", "image", "") == ["flatten"]
    assert bash_complete(p, "cpcoord", "image", "flatten", "img", "--o") == ["--out"]
    # every subcommand the CLI has is offered
    loaded = [c.name for c in model(build_parser())[1]]
    assert bash_complete(p, "cpcoord", "") == sorted(loaded)
    assert set(loaded) <= set(SUBCOMMANDS) and "completion" in loaded


def test_bash_completion_registered_for_the_command(tmp_path: Path) -> None:
    p = script("bash", tmp_path)
    r = subprocess.run(
        ["bash", "--norc", "-c", f"source '{p}' && complete -p cpcoord"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and "-F _cpcoord" in r.stdout, r.stdout + r.stderr


def test_zsh_script_is_valid_and_lists_everything(tmp_path: Path) -> None:
    require(shutil.which("zsh") is not None, "zsh (Debian package zsh)")
    p = script("zsh", tmp_path)
    r = subprocess.run(["zsh", "-n", str(p)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    text = p.read_text()
    assert text.startswith("#compdef cpcoord")
    for c in model(build_parser())[1]:
        assert f"'{c.name}:" in text and f"        {c.name})" in text
    # it loads under compinit without errors
    prog = f"autoload -U compinit && compinit -u -D && source '{p}' && echo ok"
    r = subprocess.run(
        ["zsh", "-f", "-c", prog],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, HOME=str(tmp_path)),
    )
    assert r.stdout.strip() == "ok", r.stderr


def test_fish_completes_subcommands_and_options(tmp_path: Path) -> None:
    require(shutil.which("fish") is not None, "fish (Debian package fish)")
    p = script("fish", tmp_path)

    def complete(line: str) -> list[str]:
        r = subprocess.run(
            ["fish", "--no-config", "-c", f"source '{p}'; complete -C '{line}'"],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, HOME=str(tmp_path)),
        )
        assert r.returncode == 0, r.stderr
        return sorted(x.split("\t")[0] for x in r.stdout.splitlines() if x)

    assert complete("cpcoord chec") == ["check", "checkpoint"]
    assert complete("cpcoord checkpoint --j") == ["--job", "--json"]
    assert complete("cpcoord agent --compress ") == ["auto", "none", "zstd"]
    assert complete("cpcoord image ") == ["flatten"]
