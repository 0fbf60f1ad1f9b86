"""The CLI's contract with scripts: every `--json` output validated against its schema in
docs/json-schemas/ (run against a real cluster with a target process of known memory,
or locally for the local commands), the documented exit codes of common failures with a
one-line message and no traceback, and an example in every subcommand's --help."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from referencing import Registry, Resource

from cpcoord import errors
from cpcoord.cli import build_parser
from cpcoord.config import subparsers
from testbed.cluster import Cluster
from testbed.daemons import REPO
from testbed.driver import Target

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCHEMAS = REPO / "docs" / "json-schemas"
PAGE = 4096


def _registry() -> tuple[Registry, dict[str, dict[str, Any]]]:
    docs = {p.stem: json.loads(p.read_text()) for p in sorted(SCHEMAS.glob("*.json"))}
    reg: Registry = Registry().with_resources(
        (d["$id"], Resource.from_contents(d)) for d in docs.values()
    )
    return reg, docs


REGISTRY, DOCS = _registry()


def validate(name: str, doc: Any) -> Any:
    """Validate `doc` against docs/json-schemas/NAME.json; every error in the message."""
    schema = DOCS[name]
    v = jsonschema.Draft202012Validator(schema, registry=REGISTRY)
    errs = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errs, f"{name}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errs
    )
    return doc


def env() -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(REPO))
    for k in ("CPCOORD_COORDINATOR", "CPCOORD_FAULT_PAUSE", "CPCOORD_TOKEN", "CPCOORD_INSECURE"):
        e.pop(k, None)
    e["CPCOORD_CONFIG"] = os.devnull  # no user or system config file leaks in
    return e


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpcoord", *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_json(c: Cluster, schema: str, *args: str) -> Any:
    r = run(*args, "--json", "--coordinator", c.address)
    assert r.returncode == 0, f"cpcoord {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}"
    assert r.stderr == "", f"--json prints nothing else: {r.stderr!r}"
    return validate(schema, json.loads(r.stdout))


def test_schemas_are_valid_and_documented() -> None:
    assert DOCS, "docs/json-schemas/ holds the schemas"
    for name, schema in DOCS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$id"].endswith(f"/{name}.json"), name
    required = set(DOCS["checkpoint"]["required"])
    assert {
        "generation",
        "state",
        "members",
        "pages_captured",
        "bytes_logical",
        "bytes_stored_new",
        "frozen_seconds",
        "seconds",
    } <= required
    # every subcommand with --json has a schema
    for name, p in subparsers(build_parser()).items():
        if any("--json" in a.option_strings for a in p._actions):
            assert name in DOCS, f"no docs/json-schemas/{name}.json"
    doc = (REPO / "docs" / "config.md").read_text()
    assert "json-schemas" in doc or "json-schemas" in (REPO / "README.md").read_text()


def test_json_of_every_cluster_command_matches_its_schema(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    c = cluster_factory(nodes=("node-a",))
    t = target_factory(maps=["data:32"])
    m = t.mapping("data")
    rng = f"{m.addr:#x}-{m.end:#x}"
    a = cli_json(c, "attach", "attach", "--job", "js", "--member", "m0", "--pid", str(t.pid),
                 "--node", "node-a", "--range", rng)  # fmt: skip
    assert (a["name"], a["pid"], a["regions"][0]["start"]) == ("m0", t.pid, hex(m.addr))

    g1 = cli_json(c, "checkpoint", "checkpoint", "--job", "js")
    assert g1["state"] == "committed" and g1["generation"] == 1 and g1["members"] == 1
    assert g1["pages_captured"] == 32 and g1["bytes_logical"] == 32 * PAGE
    t.cmd("write", name="data", page=3, count=2, counter=7)
    g2 = cli_json(c, "checkpoint", "checkpoint", "--job", "js")
    assert g2["parent"] == 1 and 2 <= g2["pages_captured"] < 32

    jobs = cli_json(c, "jobs", "jobs")
    (j,) = jobs["jobs"]
    assert j["job"] == "js" and j["last_committed"]["generation"] == 2

    gens = cli_json(c, "generations", "generations", "--job", "js", "--all")
    assert [g["generation"] for g in gens["generations"]] == [2, 1]
    pinned = cli_json(c, "generations", "generations", "--job", "js", "--pin", "1")
    assert pinned["pinned"] is True

    d = cli_json(c, "diff", "diff", "--job", "js", "1", "2")
    assert d["pages_changed"] >= 2 and d["bytes_changed"] == d["pages_changed"] * PAGE
    assert [3, 2] in [run_ for r in d["regions"] for run_ in r["runs"]] or any(
        o <= 3 and o + n >= 5 for r in d["regions"] for o, n in r["runs"]
    ), d

    e = cli_json(c, "export", "export", "--job", "js", "--out", str(tmp_path / "x"))
    assert (e["generation"], e["members"], e["pages"]) == (2, 1, 32)

    r = cli_json(c, "restore", "restore", "--job", "js", "--generation", "1")
    # Only the pages that differ from the member's base (generation 2) are written.
    assert r["state"] == "restored" and 1 <= r["pages"] < 32 and r["members"][0]["member"] == "m0"
    assert 1 <= r["members"][0]["pages_written"] < 32, r
    t.assert_running()

    v = cli_json(c, "verify", "verify")
    assert v["ok"] is True and v["generations"] == 2 and v["damage"] == []

    gc = cli_json(c, "gc", "gc", "--keep", "1", "--dry-run")
    assert gc["dry_run"] is True and gc["dropped"] == []  # generation 1 is pinned


def test_json_of_local_commands_matches_its_schema(
    target_factory: Callable[..., Target], tmp_path: Path
) -> None:
    t = target_factory(maps=["data:16"])
    m = t.mapping("data")

    def local(schema: str, *args: str) -> Any:
        r = run(*args, "--json")
        assert r.returncode in (0, errors.NoKernelTracker.exit_code), r.stdout + r.stderr
        return validate(schema, json.loads(r.stdout))

    cap = local("capture", "capture", "--pid", str(t.pid), "--range", f"{m.addr:#x}-{m.end:#x}",
                "--out", str(tmp_path / "img"))  # fmt: skip
    assert cap["pages"] == 16 and cap["bytes"] == 16 * PAGE
    flat = local("image-flatten", "image", "flatten", str(tmp_path / "img"), "--out",
                 str(tmp_path / "flat"))  # fmt: skip
    assert flat["pages"] == 16
    chk = local("check", "check")
    assert {tr["name"] for tr in chk["trackers"]} >= {"hash"}
    t.assert_running()


def one_line_error(r: subprocess.CompletedProcess[str], code: int) -> str:
    assert r.returncode == code, f"exit {r.returncode}, want {code}: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cpcoord: error: "), r.stderr
    documented = (REPO / "docs" / "exit-codes.md").read_text()
    assert f"| {code} |" in documented, f"exit code {code} is not in docs/exit-codes.md"
    return lines[0]


def test_exit_codes_of_common_failures(
    cluster_factory: Callable[..., Cluster], target_factory: Callable[..., Target]
) -> None:
    # unreachable coordinator (a port nothing listens on), for a unary and a stream call
    for cmd in (["jobs"], ["checkpoint", "--job", "j"], ["verify"]):
        r = run(*cmd, "--coordinator", "127.0.0.1:1", "--timeout", "5")
        assert "127.0.0.1:1" in one_line_error(r, errors.CoordinatorUnavailable.exit_code)
    # no address at all
    one_line_error(run("jobs"), errors.NoCoordinatorAddress.exit_code)
    c = cluster_factory(nodes=("node-a",))
    at = ("--coordinator", c.address)
    # unknown job
    for cmd in (["checkpoint", "--job", "nosuch"], ["export", "--job", "nosuch", "--out", "/x"]):
        r = run(*cmd, *at)
        assert "nosuch" in one_line_error(r, errors.UnknownJob.exit_code), r.stderr
    # bad ranges: syntax and order checked by the CLI, mapping by the agent
    t = target_factory(maps=["data:8"])
    attach = ["attach", "--job", "j", "--member", "m", "--pid", str(t.pid), "--node", "node-a"]
    one_line_error(run(*attach, "--range", "12-zz", *at), errors.RangeSyntax.exit_code)
    one_line_error(run(*attach, "--range", "0x2000-0x1000", *at), errors.RangeInverted.exit_code)
    r = run(*attach, "--range", "0x1000-0x3000", *at)
    one_line_error(r, errors.RangeUnmapped.exit_code)
    # a bad name, a generation that does not exist
    one_line_error(run("checkpoint", "--job", "bad/name", *at), errors.InvalidName.exit_code)
    m = t.mapping("data")
    assert run(*attach, "--range", f"{m.addr:#x}-{m.end:#x}", *at).returncode == 0
    r = run("export", "--job", "j", "--generation", "9", "--out", "/tmp/never", *at)
    one_line_error(r, errors.NoSuchGeneration.exit_code)
    t.assert_running()


def _all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    out = []
    for name, p in subparsers(build_parser()).items():
        out.append((name, p))
        out += [(f"{name} {n}", sp) for n, sp in subparsers(p).items()]
    return out


@pytest.mark.parametrize(("name", "parser"), _all_parsers(), ids=lambda x: str(x))
def test_every_help_shows_an_example(name: str, parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    assert "example" in text, f"cpcoord {name} --help has no example"
    lines = text[text.index("example") :].splitlines()[1:]
    assert any(ln.strip().startswith("cpcoord ") for ln in lines), text


def test_help_runs_without_a_coordinator() -> None:
    r = run("checkpoint", "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "cpcoord checkpoint --job" in r.stdout
