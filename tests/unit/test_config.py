"""The CLI config file (cpcoord/config.py): where it is found, what it may hold, the
precedence command line > environment > file > default, and errors that name the file
and key, carry their own exit codes and never echo a value."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from cpcoord import config
from cpcoord.cli import build_parser, main
from cpcoord.errors import ConfigInvalid, ConfigUnreadable

SECRET = "tok-7f3a-do-not-print"


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    p.chmod(0o600)
    return p


def parsed(
    tmp_path: Path, text: str, argv: list[str], env: dict[str, str] | None = None
) -> argparse.Namespace:
    cfg = config.load(str(write(tmp_path, text)), {})
    parser = build_parser()
    config.apply(parser, cfg, env or {})
    return parser.parse_args(argv)


def test_client_table_defaults_every_client_command(tmp_path: Path) -> None:
    text = f"""
[client]
coordinator = "10.1.2.3:7420"
timeout = 7
token = "{SECRET}"
tls-ca = "~/pki/ca.pem"
"""
    for cmd in (["jobs"], ["checkpoint", "--job", "j"], ["gc"], ["verify"]):
        a = parsed(tmp_path, text, cmd)
        assert a.coordinator == "10.1.2.3:7420", cmd
        assert a.timeout == 7 and a.token == SECRET
        assert a.tls_ca == Path("~/pki/ca.pem").expanduser()


def test_client_table_does_not_reach_the_agent_but_its_own_table_does(tmp_path: Path) -> None:
    text = '[client]\ncoordinator = "c:1"\n[agent]\nnode = "n7"\nlease = 3\n'
    a = parsed(tmp_path, text, ["agent"])
    assert a.coordinator is None, "[client] is the CLI user's connection, not the agent's"
    assert a.node == "n7" and a.lease == 3.0


def test_precedence_command_line_environment_file_default(tmp_path: Path) -> None:
    text = '[client]\ncoordinator = "file:1"\ninsecure = true\n[checkpoint]\nlease_ms = 5000\n'
    env = {"CPCOORD_COORDINATOR": "env:2", "CPCOORD_INSECURE": "0"}
    # file beats the built-in default
    a = parsed(tmp_path, text, ["checkpoint", "--job", "j"])
    assert (a.coordinator, a.insecure, a.lease_ms) == ("file:1", True, 5000)
    # environment beats the file
    a = parsed(tmp_path, text, ["checkpoint", "--job", "j"], env)
    assert (a.coordinator, a.insecure) == ("env:2", False)
    # command line beats both
    a = parsed(tmp_path, text, ["checkpoint", "--job", "j", "--coordinator", "cli:3"], env)
    assert a.coordinator == "cli:3"
    a = parsed(tmp_path, text, ["checkpoint", "--job", "j", "--lease-ms", "9"], env)
    assert a.lease_ms == 9
    # nothing anywhere: the built-in default
    a = parsed(tmp_path, "", ["checkpoint", "--job", "j"])
    assert (a.coordinator, a.insecure, a.lease_ms, a.full) == (None, False, 0, False)


def test_a_subcommand_table_beats_the_client_table(tmp_path: Path) -> None:
    text = '[client]\ntoken_file = "/f"\ntimeout = 3\n[gc]\ntoken = "t"\ntimeout = 60\n'
    a = parsed(tmp_path, text, ["gc"])
    assert (a.token, a.token_file, a.timeout) == ("t", None, 60.0)
    a = parsed(tmp_path, text, ["jobs"])
    assert (a.token, a.token_file, a.timeout) == (None, Path("/f"), 3)


def test_environment_token_beats_the_files_token_file(tmp_path: Path) -> None:
    text = '[client]\ntoken_file = "/etc/cpcoord/token"\n'
    assert parsed(tmp_path, text, ["jobs"]).token_file == Path("/etc/cpcoord/token")
    assert parsed(tmp_path, text, ["jobs"], {"CPCOORD_TOKEN": "x"}).token_file is None


def test_subcommand_tables_and_required_options(tmp_path: Path) -> None:
    text = """
[checkpoint]
full = true
pin = true
[coordinator]
store = "/var/lib/cpcoord"
keep = 9
listen = "127.0.0.1:7420"
[restore]
member = ["rank-0", "rank-1"]
[agent]
compress = "zstd"
"""
    a = parsed(tmp_path, text, ["checkpoint", "--job", "j"])
    assert a.full is True and a.pin is True
    # --store and --listen are required on the command line, unless the file gives them
    a = parsed(tmp_path, text, ["coordinator"])
    assert (a.store, a.keep, a.listen) == ("/var/lib/cpcoord", 9, "127.0.0.1:7420")
    assert parsed(tmp_path, text, ["restore", "--job", "j"]).member == ["rank-0", "rank-1"]
    assert parsed(tmp_path, text, ["agent"]).compress == "zstd"
    with pytest.raises(SystemExit):
        parsed(tmp_path, "", ["coordinator"])


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[client]\ncoordinater = "x"\n', "client.coordinater"),
        ("[chekpoint]\nfull = true\n", "[chekpoint]"),
        ("[checkpoint]\nfulll = true\n", "checkpoint.fulll"),
        ("[checkpoint]\nfull = 1\n", "checkpoint.full: expected a boolean, got integer"),
        ('[checkpoint]\nlease_ms = "5000"\n', "checkpoint.lease_ms: expected an integer"),
        ("[checkpoint]\nlease_ms = true\n", "checkpoint.lease_ms: expected an integer"),
        ('[client]\ninsecure = "yes"\n', "client.insecure: expected a boolean, got string"),
        ("[client]\ntimeout = [1]\n", "client.timeout: expected a number, got array"),
        ('[agent]\ncompress = "lz4"\n', "agent.compress: expected one of auto, zstd, none"),
        ('[restore]\nmember = "rank-0"\n', "restore.member: expected an array, got string"),
        ("[restore]\nmember = [1]\n", "restore.member[0]: expected a string"),
        ('coordinator = "x"\n', "top-level key 'coordinator'"),
        ("[generations]\ndelete = 3\n", "generations.delete"),  # acting options: never
        ('[client]\ntoken = "a"\ntoken_file = "b"\n', "give one"),
        ('[jobs]\ntoken = "a"\ntoken_file = "b"\n', "jobs.token and jobs.token_file"),
        ("[client\n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_file_and_the_key(tmp_path: Path, text: str, where: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigInvalid) as e:
        config.apply(build_parser(), config.load(str(p), {}), {})
    msg = e.value.message()
    assert str(p) in msg and where in msg, msg
    assert e.value.exit_code == 125


@pytest.mark.parametrize(
    "text",
    [
        f"[client]\ntoken = [{SECRET!r}]\n",
        f"[client]\ntimeout = {SECRET!r}\n",
        f"[checkpoint]\nlease_ms = {SECRET!r}\n",
        f"[agent]\ncompress = {SECRET!r}\n",
        f"[client]\ntoken = {SECRET!r}\nbogus = 1\n",
    ],
)
def test_errors_never_echo_values(tmp_path: Path, text: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigInvalid) as e:
        config.apply(build_parser(), config.load(str(p), {}), {})
    assert SECRET not in e.value.message()


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigUnreadable) as e:
        config.load(str(tmp_path / "missing.toml"), {})
    assert "missing.toml" in e.value.message() and e.value.exit_code == 126
    with pytest.raises(ConfigUnreadable):
        config.load(str(tmp_path), {})  # a directory
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[client]")
    with pytest.raises(ConfigInvalid, match="not UTF-8"):
        config.load(str(tmp_path / "bin.toml"), {})
    assert ConfigInvalid.exit_code != ConfigUnreadable.exit_code


def test_where_the_file_is_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, xdg, system = tmp_path / "home", tmp_path / "xdg", tmp_path / "etc.toml"
    monkeypatch.setattr(config, "SYSTEM_PATH", system)
    assert config.locate(None, {"HOME": str(home)}) == (None, False)
    assert config.load(None, {"HOME": str(home)}) == config.Config()
    system.write_text("")
    assert config.locate(None, {"HOME": str(home)}) == (system, False)
    (home / ".config" / "cpcoord").mkdir(parents=True)
    (home / ".config" / "cpcoord" / "config.toml").write_text("")
    assert config.locate(None, {"HOME": str(home)})[0] == home / ".config/cpcoord/config.toml"
    (xdg / "cpcoord").mkdir(parents=True)
    (xdg / "cpcoord" / "config.toml").write_text("")
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(xdg)}
    assert config.locate(None, env)[0] == xdg / "cpcoord/config.toml"
    env["CPCOORD_CONFIG"] = str(tmp_path / "env.toml")
    assert config.locate(None, env) == (tmp_path / "env.toml", True)
    assert config.locate(str(tmp_path / "flag.toml"), env) == (tmp_path / "flag.toml", True)


def test_token_in_a_file_others_can_read_warns_without_the_token(tmp_path: Path) -> None:
    p = write(tmp_path, f'[client]\ntoken = "{SECRET}"\n')
    assert config.load(str(p), {}).warnings == ()
    p.chmod(0o644)
    (w,) = config.load(str(p), {}).warnings
    assert "chmod 600" in w and SECRET not in w


def test_main_reports_config_errors_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CPCOORD_CONFIG", raising=False)
    p = write(tmp_path, "[checkpoint]\nful = true\n")
    assert main(["--config", str(p), "checkpoint", "--job", "j"]) == 125
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint.ful" in err and "Traceback" not in err
    monkeypatch.setenv("CPCOORD_CONFIG", str(tmp_path / "nope.toml"))
    assert main(["jobs"]) == 126
    assert "nope.toml" in capsys.readouterr().err
    # --config is a global option: after the subcommand it is a usage error
    monkeypatch.setenv("CPCOORD_CONFIG", os.devnull)
    with pytest.raises(SystemExit) as e:
        main(["jobs", "--config", str(p)])
    assert e.value.code == 2


def test_main_uses_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file's coordinator address is the one dialled: an unreachable one gives the
    unreachable-coordinator exit code, not the no-address one."""
    monkeypatch.delenv("CPCOORD_COORDINATOR", raising=False)
    p = write(tmp_path, '[client]\ncoordinator = "127.0.0.1:1"\ntimeout = 5\ninsecure = true\n')
    monkeypatch.setenv("CPCOORD_CONFIG", str(p))
    assert main(["jobs"]) == 70
    monkeypatch.setenv("CPCOORD_CONFIG", os.devnull)  # an empty file: no address at all
    assert main(["jobs"]) == 76


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    """The full example in docs/config.md parses and applies as it stands."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    block = doc.split("### A full example", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = config.load(str(write(tmp_path, block)), {})
    parser = build_parser()
    config.apply(parser, cfg, {})
    a = parser.parse_args(["checkpoint", "--job", "j"])
    assert (a.coordinator, a.lease_ms, a.full) == ("coord.example:7420", 5000, False)
    a = parser.parse_args(["coordinator"])
    assert (a.listen, a.keep, a.metrics_port) == ("0.0.0.0:7420", 5, 9463)
    a = parser.parse_args(["agent"])
    assert (a.node, a.compress, a.tls_ca) == (
        "gpu-node-17",
        "zstd",
        Path("/etc/cpcoord/pki/ca.pem"),
    )


def test_default_location_we_may_not_look_into_counts_as_absent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user who dropped root keeps HOME=/root, where is_file raises EACCES: no config,
    no crash (the capture-as-nobody test caught this)."""

    def denied(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", denied)
    assert config.locate(None, {"HOME": str(tmp_path)}) == (None, False)
