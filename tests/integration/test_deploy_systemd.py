"""The systemd units in deploy/systemd/, validated as far as this machine allows.

This container does not run systemd as PID 1, so the units cannot be started here.
What is checked instead:

- `systemd-analyze verify` (the unit parser and loader of systemd itself) accepts both
  units without a warning, and its dump of the loaded unit shows the capability sets
  exactly as written (a misspelt capability would be dropped silently otherwise);
- `systemd-analyze security --offline=yes` rates their exposure low;
- ExecStart, with the unit's default environment, parses with cpcoord's own CLI parser;
- the agent's capability set is both enough and needed: a real agent runs as an
  unprivileged user with exactly the unit's ambient capabilities and no_new_privs
  (`setpriv`, as systemd would set them up) and checkpoints a root-owned member exactly;
  without the DAC capabilities the same agent cannot.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cpcoord.cli import build_parser
from cpcoord.image import load_image, region_bytes
from testbed.cluster import Cluster
from testbed.daemons import REPO, Daemon, wait_for
from testbed.driver import Target
from tests.conftest import require
from tests.helpers.e2e import attach

pytestmark = pytest.mark.integration

UNITS = REPO / "deploy" / "systemd"
NAMES = ("cpcoord-coordinator.service", "cpcoord-agent.service")
AGENT_UID = 64999  # an unprivileged user that owns nothing


def unit_settings(name: str) -> dict[str, list[str]]:
    """Key -> values in order (keys may repeat), comments and sections dropped."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        k, _, v = line.partition("=")
        out.setdefault(k.strip(), []).append(v.strip())
    return out


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    require(path is not None, "systemd-analyze (Debian package systemd)")
    assert path is not None
    return path


def installed_copy(tmp: Path) -> list[Path]:
    """The units with ExecStart pointing at an executable that exists here."""
    exe = shutil.which("cpcoord") or "/bin/true"
    out = []
    for n in NAMES:
        p = tmp / n
        p.write_text(
            (UNITS / n).read_text().replace("/usr/local/bin/cpcoord", os.path.realpath(exe))
        )
        out.append(p)
    return out


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    units = installed_copy(tmp_path)
    r = subprocess.run(
        [analyze(), "verify", *map(str, units)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "cpcoord" in line]
    assert not ours, "systemd-analyze verify complains:\n" + "\n".join(ours)


@pytest.mark.parametrize("name", NAMES)
def test_capabilities_parse_as_written(tmp_path: Path, name: str) -> None:
    unit = next(p for p in installed_copy(tmp_path) if p.name == name)
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="debug")
    r = subprocess.run(
        [analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=120, env=env
    )
    dump = r.stdout + r.stderr
    s = unit_settings(name)
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        want = sorted(c.lower() for c in s[key][-1].split())
        got = re.findall(rf"^\s+{key}: ?(.*)$", dump, re.M)
        # An empty set is not dumped at all; a non-empty one must list exactly ours.
        assert sorted(got[0].split()) == want if got else want == [], (key, got, want)
    assert re.search(r"^\s+ProtectSystem: strict", dump, re.M)
    assert re.search(r"^\s+ProtectHome: yes", dump, re.M)
    assert re.search(r"^\s+PrivateTmp: yes", dump, re.M)


@pytest.mark.parametrize("name,limit", [(NAMES[0], 2.0), (NAMES[1], 3.0)])
def test_exposure_is_low(tmp_path: Path, name: str, limit: float) -> None:
    unit = next(p for p in installed_copy(tmp_path) if p.name == name)
    r = subprocess.run(
        [analyze(), "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= limit, f"{name}: exposure {m.group(1)}\n{r.stdout}"
    r = subprocess.run(
        [analyze(), "security", "--offline=yes", "--json=short", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    checks = {e["json_field"]: e["set"] for e in json.loads(r.stdout)}
    for field_ in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
        assert checks[field_], f"{name}: {field_} not set"
    for cap in ("SYS_ADMIN", "SYS_MODULE", "NET_ADMIN", "KILL", "SYS_RAWIO", "BPF"):
        assert checks[f"CapabilityBoundingSet_CAP_{cap}"], f"{name}: may hold CAP_{cap}"


def exec_argv(name: str) -> list[str]:
    """ExecStart as systemd would run it with the unit's default environment."""
    s = unit_settings(name)
    env = {}
    for item in s.get("Environment", []):
        k, _, v = item.partition("=")
        env[k] = v.replace("%H", "node-1")
    cmd = s["ExecStart"][-1]
    # ${VAR} is one word; $VAR splits on white space (systemd.service(5)).
    words = []
    for w in shlex.split(cmd):
        if re.fullmatch(r"\$[A-Z_]+", w):
            words += env[w[1:]].split()
        else:
            words.append(re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m.group(1)], w))
    return words


@pytest.mark.parametrize("name", NAMES)
def test_execstart_parses_with_the_cli(name: str) -> None:
    argv = exec_argv(name)
    assert argv[0] == "/usr/local/bin/cpcoord"
    args = build_parser().parse_args(argv[1:])
    want = "coordinator" if "coordinator" in name else "agent"
    assert args.command == want
    assert args.metrics_port == (7421 if want == "coordinator" else 7422)


def commented_insecure_execstart(name: str) -> str:
    """The ExecStart of the unit's commented "trying it out" drop-in."""
    lines = [x.strip().removeprefix("#").strip() for x in (UNITS / name).read_text().splitlines()]
    (cmd,) = [x for x in lines if x.startswith("ExecStart=/") and "--insecure" in x]
    return cmd.removeprefix("ExecStart=")


@pytest.mark.parametrize("name", NAMES)
def test_units_speak_mtls_with_an_explicit_insecure_alternative(name: str) -> None:
    """The shipped units never pass --insecure: ExecStart takes --tls-* (and the
    coordinator --tokens) from systemd credentials loaded from /etc/cpcoord/tls; the
    plaintext way of trying it out is a commented drop-in that parses as well."""
    s = unit_settings(name)
    live = "\n".join(f"{k}={v}" for k, vs in s.items() for v in vs)
    assert "--insecure" not in live, f"{name} runs without TLS"
    args = build_parser().parse_args(exec_argv(name)[1:])
    assert not args.insecure
    creds = dict(v.split(":", 1) for v in s["LoadCredential"])
    files = [args.tls_cert, args.tls_key, args.tls_ca]
    if args.command == "coordinator":
        files.append(args.tokens)
        assert args.listen.startswith("0.0.0.0:")  # TLS: reachable by other nodes
    for f in files:
        assert f is not None and str(f).startswith("%d/"), (name, f)
        src = creds[str(f).removeprefix("%d/")]
        assert src.startswith("/etc/cpcoord/tls/"), src
    assert not any(v.endswith("ca.key") for v in creds.values()), "the CA key stays offline"
    words = shlex.split(commented_insecure_execstart(name))
    alt = build_parser().parse_args(
        [re.sub(r"\$\{[A-Z_]+\}", "7", w) if "${" in w else w for w in words[1:]]
    )
    assert alt.insecure and alt.command == args.command and alt.tls_cert is None
    if alt.command == "coordinator":
        assert alt.listen.startswith("127.0.0.1:") and not alt.insecure_bind_any


# -- the agent's capabilities, exercised ------------------------------------------------


def caps(name: str, key: str) -> list[str]:
    return [c.lower().removeprefix("cap_") for c in unit_settings(name)[key][-1].split()]


@dataclass
class _SetprivDaemon(Daemon):
    """A daemon started through setpriv: another uid, given capabilities, no_new_privs."""

    prefix: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.argv = [*self.prefix, *self.argv]
        super().start()


@dataclass
class ConfinedCluster(Cluster):
    agent_caps: Sequence[str] = ()
    agent_uid: int | None = AGENT_UID  # None: stay root (uid 0), capabilities still cut

    def start_agent(self, node: str, pause: Sequence[str] = ()) -> Daemon:
        if node not in self.agents:
            c = ",".join(["-all", *(f"+{x}" for x in self.agent_caps)])
            prefix = [shutil.which("setpriv") or "setpriv", "--no-new-privs",
                      f"--inh-caps={c}", f"--ambient-caps={c}", f"--bounding-set={c}"]  # fmt: skip
            if self.agent_uid is not None:
                prefix += [f"--reuid={self.agent_uid}", f"--regid={self.agent_uid}"]
                prefix.append("--clear-groups")
            log = self.root / f"agent-{node}.log"
            self.agents[node] = _SetprivDaemon(f"agent-{node}", [], log, {}, prefix=prefix)
        return super().start_agent(node, pause)


def confined(tmp: Path, agent_caps: Sequence[str], uid: int | None = AGENT_UID) -> ConfinedCluster:
    require(shutil.which("setpriv") is not None, "setpriv (Debian package util-linux)")
    require(os.geteuid() == 0, "root, to start an agent as another user")
    c = ConfinedCluster(tmp, nodes=("node-a",), agent_caps=tuple(agent_caps), agent_uid=uid)
    tmp.mkdir(parents=True)
    return c


@pytest.mark.slow
def test_the_agent_units_capabilities_are_enough(
    tmp_path: Path, target_factory: Callable[..., Target]
) -> None:
    """Unprivileged uid, the unit's ambient capabilities, no_new_privs: a member owned
    by root (another user, with every capability) is checkpointed exactly."""
    ambient = caps("cpcoord-agent.service", "AmbientCapabilities")
    assert sorted(ambient) == sorted(caps("cpcoord-agent.service", "CapabilityBoundingSet"))
    c = confined(tmp_path / "ok", ambient)
    try:
        c.start()
        t = target_factory(maps=["data:48"])
        assert os.stat(f"/proc/{t.pid}").st_uid == 0 != AGENT_UID
        assert _uid(c.agents["node-a"].pid) == AGENT_UID  # setpriv execs in place
        attach(c, "j", "m", t, "node-a")
        r1 = c.cli_json("checkpoint", "--job", "j")
        assert r1["state"] == "committed", r1
        want1 = t.read("data")
        t.cmd("write", name="data", page=7, count=3, counter=5)
        r2 = c.cli_json("checkpoint", "--job", "j")
        assert r2["state"] == "committed" and not r2["full"], r2
        assert r2["pages_captured"] < 48, "the tracker works under these capabilities"
        want2 = t.read("data")
        for n, want in ((r1["generation"], want1), (r2["generation"], want2)):
            out = tmp_path / f"export-{n}"
            c.cli("export", "--job", "j", "--generation", str(n), "--out", str(out))
            im = load_image(out)
            (reg,) = im.member("m").regions
            got = np.array(region_bytes(im, "m", reg.name))
            assert np.array_equal(got, want), f"generation {n} differs"
        t.assert_running()
    finally:
        c.close()


@pytest.mark.slow
def test_ptrace_alone_cannot_checkpoint_another_users_process(tmp_path: Path) -> None:
    """An agent that is root (uid 0) but holds only CAP_SYS_PTRACE can seize and read a
    process of another user, yet not open its /proc/PID/pagemap (mode 0400, owned by that
    user): no generation commits, and the member is never left frozen. This is why the
    unit adds CAP_DAC_READ_SEARCH."""
    sleep = shutil.which("sleep") or "/bin/sleep"
    member = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sleep, "300"]
    )
    c = confined(tmp_path / "bare", ["sys_ptrace"], uid=None)
    try:
        wait_for(lambda: _uid(member.pid) == 65534, 10, "the member running as nobody")
        c.start()
        # No --range: every writable private mapping of `sleep` (its data, heap, stack).
        c.cli("attach", "--job", "j", "--member", "m", "--pid", str(member.pid),
              "--node", "node-a")  # fmt: skip
        r = c.cli("checkpoint", "--job", "j", "--json", check=False)
        assert r.returncode != 0, "an agent with CAP_SYS_PTRACE alone checkpointed it"
        assert "pagemap" in (r.stdout + r.stderr + c.logs()).lower(), r.stderr
        wait_for(lambda: _state(member.pid) not in "tT", 15, "the member running")
    finally:
        c.close()
        member.kill()
        member.wait(timeout=30)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return -1
