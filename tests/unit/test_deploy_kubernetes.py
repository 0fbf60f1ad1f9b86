"""deploy/kubernetes/, checked offline: no cluster, no network.

A small schema check (every document has apiVersion, kind, metadata; the kinds the
deployment needs are there; selectors match pod labels; Services and ServiceMonitors
name ports that exist), then consistency with the rest of cpcoord: container args parse
with cpcoord's own CLI parser, ports in args equal the declared container ports, the
agent reaches the coordinator's Service, the agent's capabilities are the systemd unit's,
the PrometheusRule holds exactly deploy/prometheus/alerts.yml, and the scrape job names
are the ones the alert rules select on, and kustomization.yaml lists every file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from cpcoord.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
NAMESPACED = {"Deployment", "DaemonSet", "Service", "PersistentVolumeClaim", "ServiceMonitor",
              "PrometheusRule"}  # fmt: skip


def docs() -> list[dict[str, Any]]:
    out = []
    for p in sorted(K8S.glob("*.yaml")):
        if p.name == "kustomization.yaml":
            continue
        for d in yaml.safe_load_all(p.read_text()):
            if d is not None:
                d["_file"] = p.name
                out.append(d)
    return out


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} documents"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (c,) = workload["spec"]["template"]["spec"]["containers"]
    return c


def parse_args(c: dict[str, Any]) -> Any:
    assert c["command"] == ["cpcoord"]
    args = [a.replace("$(NODE_NAME)", "node-1") for a in c["args"]]
    return build_parser().parse_args(args)


def test_documents_have_the_basics_and_the_needed_kinds() -> None:
    ds = docs()
    for d in ds:
        assert d.get("apiVersion") and d.get("kind"), d["_file"]
        assert d["metadata"].get("name"), d["_file"]
        if d["kind"] in NAMESPACED:
            assert d["metadata"].get("namespace") == "cpcoord", (d["_file"], d["kind"])
    kinds = [(d["kind"], d["metadata"]["name"]) for d in ds]
    for want in [
        ("Namespace", "cpcoord"),
        ("Deployment", "cpcoord-coordinator"),
        ("Service", "cpcoord-coordinator"),
        ("PersistentVolumeClaim", "cpcoord-store"),
        ("DaemonSet", "cpcoord-agent"),
        ("Service", "cpcoord-agent"),
        ("ServiceMonitor", "cpcoord-coordinator"),
        ("ServiceMonitor", "cpcoord-agent"),
        ("PrometheusRule", "cpcoord"),
    ]:
        assert want in kinds, f"missing {want}"
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted({d["_file"] for d in ds})


@pytest.mark.parametrize("kind,name", [("Deployment", "cpcoord-coordinator"),
                                       ("DaemonSet", "cpcoord-agent")])  # fmt: skip
def test_selectors_match_pod_labels(kind: str, name: str) -> None:
    w = one(kind, name)
    labels = w["spec"]["template"]["metadata"]["labels"]
    sel = w["spec"]["selector"]["matchLabels"]
    assert sel.items() <= labels.items()
    svc = one("Service", name)
    assert svc["spec"]["selector"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in container(w)["ports"]}
    for sp in svc["spec"]["ports"]:
        assert sp["targetPort"] in ports, f"{name}: Service port {sp} names no container port"
        assert sp["port"] == ports[sp["targetPort"]]


def test_coordinator_args_ports_and_store() -> None:
    d = one("Deployment", "cpcoord-coordinator")
    assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
    c = container(d)
    a = parse_args(c)
    assert a.command == "coordinator"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(a.listen.rpartition(":")[2]) == ports["grpc"]
    assert a.metrics_port == ports["metrics"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
    store_vol = next(n for n, p in mounts.items() if Path(a.store).is_relative_to(p))
    assert vols[store_vol]["persistentVolumeClaim"]["claimName"] == "cpcoord-store"
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    for probe in ("readinessProbe", "livenessProbe"):
        # mTLS: the kubelet's (plaintext) gRPC probe cannot pass the handshake.
        assert c[probe]["tcpSocket"]["port"] in ("grpc", ports["grpc"])


def test_agent_args_reach_the_coordinator_and_caps_match_the_unit() -> None:
    ds = one("DaemonSet", "cpcoord-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    c = container(ds)
    a = parse_args(c)
    assert a.command == "agent"
    svc = one("Service", "cpcoord-coordinator")
    host, _, port = a.coordinator.rpartition(":")
    assert host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert int(port) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc"}
    assert a.node == "node-1"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert a.metrics_port == ports["metrics"]
    sc = c["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["allowPrivilegeEscalation"] is False
    unit = (REPO / "deploy" / "systemd" / "cpcoord-agent.service").read_text()
    line = next(x for x in unit.splitlines() if x.startswith("AmbientCapabilities="))
    unit_caps = {x.removeprefix("CAP_") for x in line.partition("=")[2].split()}
    assert set(sc["capabilities"]["add"]) == unit_caps, "the DaemonSet and the unit disagree"
    assert "SYS_PTRACE" in unit_caps and "SYS_ADMIN" not in unit_caps


def test_one_image_for_both() -> None:
    images = {container(one(k, n))["image"] for k, n in
              (("Deployment", "cpcoord-coordinator"), ("DaemonSet", "cpcoord-agent"))}  # fmt: skip
    assert len(images) == 1
    (image,) = images
    assert ":" in image and not image.endswith(":latest"), "pin the image"


def test_service_monitors_scrape_what_the_alerts_select() -> None:
    rules = (REPO / "deploy" / "prometheus" / "alerts.yml").read_text()
    for name in ("cpcoord-coordinator", "cpcoord-agent"):
        sm = one("ServiceMonitor", name)
        svc = one("Service", name)
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
        names = {p["name"] for p in svc["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in names
        # The operator names the job after the Service; the alerts select those jobs.
        assert f'job="{name}"' in rules
        relabel = [r for ep in sm["spec"]["endpoints"] for r in ep.get("relabelings", [])]
        node = [r for r in relabel if r.get("targetLabel") == "node"]
        # Agents get `node`; the coordinator must not (its metrics carry their own).
        assert bool(node) == (name == "cpcoord-agent")


def test_prometheus_rule_is_the_alert_file() -> None:
    rule = one("PrometheusRule", "cpcoord")
    shipped = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == shipped["groups"]


def _secret_file(workload: dict[str, Any], path: Path) -> tuple[str, str]:
    """(Secret name, key) that a file path of the container comes from."""
    c = container(workload)
    vols = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    for m in c["volumeMounts"]:
        if path.is_relative_to(m["mountPath"]) and "secret" in vols[m["name"]]:
            assert m.get("readOnly") is True, m
            return vols[m["name"]]["secret"]["secretName"], path.name
    raise AssertionError(f"{path} is not in a mounted Secret")


@pytest.mark.parametrize(
    "kind,name,secret",
    [
        ("Deployment", "cpcoord-coordinator", "cpcoord-coordinator-tls"),
        ("DaemonSet", "cpcoord-agent", "cpcoord-agent-tls"),
    ],
)
def test_daemons_speak_mtls_from_a_mounted_secret(kind: str, name: str, secret: str) -> None:
    """No --insecure anywhere in the shipped manifests (comments aside); the --tls-*
    files (and the coordinator's --tokens) come from a Secret under /etc/cpcoord/tls."""
    for p in sorted(K8S.glob("*.yaml")):
        assert "--insecure" not in yaml.safe_dump_all(yaml.safe_load_all(p.read_text())), p
    w = one(kind, name)
    a = parse_args(container(w))
    assert not a.insecure
    files = [a.tls_cert, a.tls_key, a.tls_ca]
    if a.command == "coordinator":
        files.append(a.tokens)
    else:  # this node's own certificate (CN cpcoord-agent:NODE)
        assert a.tls_cert.name == f"agent-{a.node}.pem"
    for f in files:
        assert f is not None and f.is_relative_to("/etc/cpcoord/tls"), f
        assert _secret_file(w, f)[0] == secret
