"""The CLI configuration file (TOML): where it is, what it may hold, and how its values
become argparse defaults.

Precedence, highest first: command line > environment (CPCOORD_COORDINATOR, ...) > config
file > built-in default. The file is `--config PATH`, else `$CPCOORD_CONFIG`, else
`$XDG_CONFIG_HOME/cpcoord/config.toml` (default `~/.config/...`), else
`/etc/cpcoord/config.toml`; a file named explicitly must exist, the usual places may not.

Layout (docs/config.md): a `[client]` table with the connection of client commands
(coordinator, insecure, timeout, token, token_file, tls_cert, tls_key, tls_ca), and one
table per subcommand whose keys are that subcommand's long options (dashes or
underscores), e.g. `[checkpoint] full = true`, `[agent] node = "n1"`,
`[coordinator] store = "/var/lib/cpcoord"`. Values are checked against the option's type
(bool flags, int, float, paths, strings, lists for repeatable options, choices).
Errors name the file and the key and never echo a value (a value may be a secret).
"""

from __future__ import annotations

import argparse
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cpcoord.errors import ConfigInvalid, ConfigUnreadable

ENV_CONFIG = "CPCOORD_CONFIG"
SYSTEM_PATH = Path("/etc/cpcoord/config.toml")
CLIENT = "client"

# [client] keys, with the TOML type each wants and the environment variable that beats it.
_STR, _BOOL, _NUM, _PATH = "string", "boolean", "number", "path"
CLIENT_KEYS: Mapping[str, str] = MappingProxyType(
    {
        "coordinator": _STR,
        "insecure": _BOOL,
        "timeout": _NUM,
        "token": _STR,
        "token_file": _PATH,
        "tls_cert": _PATH,
        "tls_key": _PATH,
        "tls_ca": _PATH,
    }
)
ENV_OF: Mapping[str, str] = MappingProxyType(
    {
        "coordinator": "CPCOORD_COORDINATOR",
        "insecure": "CPCOORD_INSECURE",
        "token": "CPCOORD_TOKEN",
        "token_file": "CPCOORD_TOKEN",  # the environment's token beats the file's token file
        "tls_cert": "CPCOORD_TLS_CERT",
        "tls_key": "CPCOORD_TLS_KEY",
        "tls_ca": "CPCOORD_TLS_CA",
    }
)
SECRET_KEYS = frozenset({"token"})
# Options no file may default: they act (delete, pin) or are the command itself.
_NEVER = frozenset({"help", "version", "check"})


@dataclass(frozen=True)
class Config:
    """A parsed config file: the [client] table and each subcommand's table, keys
    normalised to option dests (`token-file` -> `token_file`)."""

    path: Path | None = None
    client: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    warnings: tuple[str, ...] = ()  # logged once logging is set up


def locate(explicit: str | None, env: Mapping[str, str]) -> tuple[Path | None, bool]:
    """(the file to read, whether it was named explicitly); (None, False) when none."""
    if explicit is not None:
        return Path(explicit).expanduser(), True
    if env.get(ENV_CONFIG):
        return Path(env[ENV_CONFIG]).expanduser(), True
    xdg = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")) / ".config")
    for p in (Path(xdg).expanduser() / "cpcoord" / "config.toml", SYSTEM_PATH):
        if _is_file(p):
            return p, False
    return None, False


def _is_file(p: Path) -> bool:
    """is_file() for a default location: one this user may not look into (root's HOME
    after dropping privileges) is as good as absent; Path.is_file raises on EACCES."""
    try:
        return p.is_file()
    except OSError:
        return False


def load(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Find and parse the config file; an empty Config when there is none."""
    env = os.environ if env is None else env
    path, named = locate(explicit, env)
    if path is None:
        return Config()
    try:
        raw = path.read_bytes()
    except OSError as e:
        if not named and not path.exists():
            return Config()  # vanished between the check and the read
        raise ConfigUnreadable(str(path), e.strerror or type(e).__name__) from None
    return parse(raw, path)


def parse(raw: bytes, path: Path) -> Config:
    """Parse the bytes of a config file: TOML syntax and the [client] table. Subcommand
    tables are checked against the parser in `apply` (their keys are its options)."""
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigInvalid(str(path), "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigInvalid(str(path), f"not valid TOML: {e}") from None
    client: dict[str, Any] = {}
    sections: dict[str, Mapping[str, Any]] = {}
    for name, table in doc.items():
        if not isinstance(table, dict):
            raise ConfigInvalid(
                str(path), f"top-level key {name!r}: settings go in a table, e.g. [client]"
            )
        keys = {k.replace("-", "_"): v for k, v in table.items()}
        if name == CLIENT:
            for k, v in keys.items():
                if k not in CLIENT_KEYS:
                    raise ConfigInvalid(
                        str(path), f"unknown key client.{k} (known: {', '.join(CLIENT_KEYS)})"
                    )
                client[k] = _check(path, f"client.{k}", CLIENT_KEYS[k], v)
            if "token" in client and "token_file" in client:
                raise ConfigInvalid(str(path), "client.token and client.token_file: give one")
        else:
            sections[name] = MappingProxyType(keys)
    warnings: tuple[str, ...] = ()
    has_token = "token" in client or any("token" in s for s in sections.values())
    if has_token and _readable_by_others(path):
        # A token in a file others can read is a leaked token; say so, never what it is.
        warnings = ("config file holds a token and is readable by others: chmod 600 it",)
    return Config(path, MappingProxyType(client), MappingProxyType(sections), warnings)


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def _tname(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}.get(
        type(v), "table" if isinstance(v, dict) else type(v).__name__
    )


def _check(path: Path, key: str, want: str, v: Any) -> Any:
    """The value of `key` converted to what argparse would have produced; a wrong type is
    a ConfigInvalid naming the key and the types, never the value."""
    ok = {
        _STR: isinstance(v, str),
        _PATH: isinstance(v, str) and v != "",
        _BOOL: isinstance(v, bool),
        _NUM: isinstance(v, int | float) and not isinstance(v, bool),
    }[want]
    if not ok:
        raise ConfigInvalid(str(path), f"{key}: expected a {want}, got {_tname(v)}")
    return Path(v).expanduser() if want == _PATH else v


# -- applying a Config to the argparse tree ----------------------------------------------


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Subcommand name -> its parser."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _settable(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action of the options a config file may default."""
    exclusive = {a.dest for g in p._mutually_exclusive_groups for a in g._group_actions}
    return {
        a.dest: a
        for a in p._actions
        if a.option_strings
        and a.dest not in _NEVER
        and a.dest not in exclusive
        and not isinstance(a, argparse._HelpAction | argparse._VersionAction)
    }


def _convert(path: Path, key: str, action: argparse.Action, v: Any) -> Any:
    """A TOML value for an option, checked the way argparse would check the word."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        return _check(path, key, _BOOL, v)
    if isinstance(action, argparse._AppendAction):
        if not isinstance(v, list):
            raise ConfigInvalid(str(path), f"{key}: expected an array, got {_tname(v)}")
        return [_convert_one(path, f"{key}[{i}]", action, x) for i, x in enumerate(v)]
    return _convert_one(path, key, action, v)


def _convert_one(path: Path, key: str, action: argparse.Action, v: Any) -> Any:
    t = action.type
    if t is int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigInvalid(str(path), f"{key}: expected an integer, got {_tname(v)}")
    elif t is float:
        v = float(_check(path, key, _NUM, v))
    elif t is Path:
        v = _check(path, key, _PATH, v)
    else:
        v = _check(path, key, _STR, v)
        if callable(t):
            try:
                v = t(v)
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                raise ConfigInvalid(str(path), f"{key}: not a valid value") from None
    if action.choices is not None and v not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigInvalid(str(path), f"{key}: expected one of {choices}")
    return v


def _env_default(dest: str, env: Mapping[str, str]) -> Any:
    """What the environment says for a connection option (it beats the file)."""
    v = env[ENV_OF[dest]]
    if dest == "insecure":
        return v.strip().lower() in ("1", "true", "yes")
    if dest in ("tls_cert", "tls_key", "tls_ca"):
        return Path(v)
    return None if dest == "token_file" else v.strip()


def is_client_command(p: argparse.ArgumentParser) -> bool:
    """Whether the subcommand talks to the coordinator through cpcoord.clientconn."""
    from cpcoord.clientconn import GROUP_TITLE

    return any(g.title == GROUP_TITLE for g in p._action_groups)


def apply(
    parser: argparse.ArgumentParser, cfg: Config, env: Mapping[str, str] | None = None
) -> None:
    """Make the file's values the defaults of the subcommands' options (the command line
    still wins); an option given a value stops being required. Unknown tables and keys
    and wrong types are ConfigInvalid. A connection option whose environment variable is
    set keeps the environment's value."""
    env = os.environ if env is None else env
    subs = subparsers(parser)
    path = cfg.path or Path("<config>")
    for name in cfg.sections:
        if name not in subs:
            known = ", ".join([CLIENT, *sorted(subs)])
            raise ConfigInvalid(str(path), f"unknown table [{name}] (known: {known})")
    for name, p in subs.items():
        settable = _settable(p)
        values: dict[str, Any] = {}
        if cfg.client and is_client_command(p):  # (imports gRPC: only when needed)
            values.update({k: v for k, v in cfg.client.items() if k in settable})
        for k, v in cfg.sections.get(name, {}).items():
            if k not in settable:
                opts = ", ".join(sorted(settable))
                raise ConfigInvalid(str(path), f"unknown key {name}.{k} (options: {opts})")
            values[k] = _convert(path, f"{name}.{k}", settable[k], v)
        if "token" in values and "token_file" in values:
            # The more specific table wins: drop the other one's credential.
            specific = cfg.sections.get(name, {})
            if "token" in specific and "token_file" in specific:
                raise ConfigInvalid(str(path), f"{name}.token and {name}.token_file: give one")
            values.pop("token_file" if "token" in specific else "token")
        for k in list(values):
            if k in ENV_OF and env.get(ENV_OF[k]):
                env_value = _env_default(k, env)
                if env_value is None:
                    del values[k]
                else:
                    values[k] = env_value
        for k in values:
            settable[k].required = False
        if values:
            p.set_defaults(**values)


def describe(cfg: Config) -> dict[str, Any]:
    """What was loaded, for a debug log line: tables and keys, never values."""
    return {
        "path": str(cfg.path) if cfg.path else "",
        "client": ",".join(sorted(cfg.client)),
        "tables": ",".join(sorted(cfg.sections)),
    }
