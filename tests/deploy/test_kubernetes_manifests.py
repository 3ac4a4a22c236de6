"""deploy/k8s/ against the Kubernetes API schemas, and the rules the manifests promise.

Schemas: the PyPI package kubernetes-validate (a dev dependency), which bundles the
OpenAPI-derived JSON schemas of each Kubernetes release, strict mode (unknown fields are
errors). kubeconform is in no registry reachable here; kustomize neither (PyPI's
`kustomize` is an unrelated project), so the manifests are plain files that
kustomization.yaml only lists, and the test checks that list instead of rendering it.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from coordinator.hub.registry import load_hub_config
from coordinator.hub.server import hub_serving_settings
from node.config import load_config
from tests.deploy import _containers as c

K8S = c.REPO / "deploy" / "k8s"
# The oldest release the manifests use a field of (ReadWriteOncePod is GA in 1.29) and the
# newest the package bundles.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _manifests() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(K8S.rglob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in _documents(path)
    ]


def _kind(folder: str, kind: str) -> list[dict[str, Any]]:
    return [d for p, d in _manifests() if p.parent.name == folder and d["kind"] == kind]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_under_the_api_schema(version: str) -> None:
    manifests = _manifests()
    assert len(manifests) >= 10
    for path, doc in manifests:
        kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "chc", path


def test_the_schema_check_refuses_an_unknown_field() -> None:
    statefulset = copy.deepcopy(_kind("node", "StatefulSet")[0])
    statefulset["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("folder", ["hub", "node"])
def test_kustomization_lists_the_folder_and_no_secret(folder: str) -> None:
    kustomization = _documents(K8S / folder / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    present = {p.name for p in (K8S / folder).glob("*.yaml")} - {"kustomization.yaml"}
    # The node's outbound-only policy is the alternative to its inbound one, not an addition.
    alternatives = {"networkpolicy-outbound.yaml"} if folder == "node" else set()
    assert listed == present - alternatives
    for path, doc in _manifests():
        assert doc["kind"] != "Secret", f"{path}: keys are created from files, never committed"


def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    workloads = _kind("node", "StatefulSet") + _kind("hub", "Deployment")
    assert len(workloads) == 2
    return [(w["metadata"]["name"], w["spec"]["template"]["spec"]) for w in workloads]


def test_pods_are_locked_down() -> None:
    for name, pod in _pod_specs():
        assert pod["automountServiceAccountToken"] is False, name
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] == 10001, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # Above drain_grace_s (30 s) plus the 5 s the drain waits for handlers.
        assert pod["terminationGracePeriodSeconds"] > 35, name
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), name
            assert "memory" in resources["limits"], name
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert container[probe]["grpc"] == {"port": 9465}, f"{name} {probe}"
            # Only the volumes are writable: the state (node) and /tmp.
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            tmp = "/tmp"  # noqa: S108 - the pod's own emptyDir, not the host's /tmp
            assert writable == ({"/var/lib/chc", tmp} if name == "chc-node" else {tmp})


def test_the_ledger_claim_is_one_writer_durable_storage() -> None:
    statefulset = _kind("node", "StatefulSet")[0]
    assert statefulset["spec"]["replicas"] == 1
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "ledger"
    assert claim["spec"]["accessModes"] == ["ReadWriteOncePod"]
    text = (K8S / "node" / "statefulset.yaml").read_text(encoding="utf-8")
    assert "fsync" in text  # the storage note is there
    assert "ReadWriteMany" in text


def test_probes_reach_the_health_port_the_configs_open() -> None:
    node = tomllib.loads(_kind("node", "ConfigMap")[0]["data"]["node.toml"])
    hub = tomllib.loads(_kind("hub", "ConfigMap")[0]["data"]["hub.toml"])
    # The kubelet dials the pod's address, so health listens on it (docs/observability.md).
    assert node["health_listen"] == hub["health_listen"] == "0.0.0.0:9465"
    assert node["ledger"].startswith("/var/lib/chc/")
    assert node["identity"] == hub["identity"] == "/etc/chc/identity"


def test_the_embedded_configs_load_with_the_real_loaders(tmp_path: Path) -> None:
    node_toml = tmp_path / "node.toml"
    node_toml.write_text(_kind("node", "ConfigMap")[0]["data"]["node.toml"], encoding="utf-8")
    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text(_kind("hub", "ConfigMap")[0]["data"]["hub.toml"], encoding="utf-8")
    node = load_config(node_toml)
    hub = load_hub_config(hub_toml)
    assert node.name in {n.name for n in hub.nodes}
    # The pods' grace period covers the drain those configs ask for, plus the 5 s after it.
    for name, pod in _pod_specs():
        serving = node.serving if name == "chc-node" else hub_serving_settings(hub_toml)
        drain = serving.drain_grace_s
        assert drain + 5 < pod["terminationGracePeriodSeconds"], name


def test_network_policies_admit_only_the_hub() -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in _kind("node", "NetworkPolicy")}
    inbound, outbound = policies["chc-node-inbound"], policies["chc-node-outbound"]
    for spec in (inbound, outbound):
        assert spec["policyTypes"] == ["Ingress", "Egress"]
    # Inbound mode: one ingress rule, on the node's port only, from two single addresses:
    # the hub and the auditors (who read ledgers from the node directly).
    (rule,) = inbound["ingress"]
    assert [p["port"] for p in rule["ports"]] == [50051]
    assert [list(peer) for peer in rule["from"]] == [["ipBlock"], ["ipBlock"]]
    assert all(peer["ipBlock"]["cidr"].endswith("/32") for peer in rule["from"])
    (balancer,) = [s for s in _kind("node", "Service") if s["spec"].get("type") == "LoadBalancer"]
    assert balancer["spec"]["loadBalancerSourceRanges"] == [
        peer["ipBlock"]["cidr"] for peer in rule["from"]
    ]
    # Outbound-only: no ingress; egress to one address (the hub) and to DNS, nothing else.
    assert outbound["ingress"] == []
    hub_rule, dns_rule = outbound["egress"]
    assert hub_rule["to"][0]["ipBlock"]["cidr"].endswith("/32")
    assert {p["port"] for p in dns_rule["ports"]} == {53}
    for spec in (inbound, outbound):
        for egress in spec["egress"]:
            assert "ipBlock" in egress["to"][0] or {p["port"] for p in egress["ports"]} == {53}
