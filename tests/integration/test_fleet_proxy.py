"""The Control API closed: SuperNodes reach a loopback SuperLink only through the Fleet proxies.

One federation per module: a SuperLink on 127.0.0.1, the hub's Fleet proxy (nginx, mutual
TLS, /v1/fleet/ for node certificates only) on its own port, and two SuperNodes that each
dial a local nginx forwarder presenting their node's certificate.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import tomli_w

from coordinator.learning.flower.fab import write_app
from coordinator.learning.flower.fleet_proxy import hub_fleet_proxy
from coordinator.learning.flower.launch import run_app
from coordinator.learning.flower.superlink import SuperLink, SuperLinkTls
from node.flower.supernode import SuperNodeProcess
from protocols.flower_keys import make_supernode_key
from protocols.flower_process import flower_env, free_port, venv_bin
from protocols.nginx_proxy import NginxProxy, render_node_forward
from protocols.security.pki import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    Role,
    create_ca,
    issue,
    issue_server_certificate,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

NODES = ("north", "south")
RUN_TIMEOUT_S = 120.0


@dataclass
class Federation:
    """The running processes, the PKI and where they write."""

    root: Path
    pki: Path
    superlink: SuperLink
    hub_proxy: NginxProxy
    forwarders: dict[str, NginxProxy]

    @property
    def ca(self) -> Path:
        """The federation CA certificate."""
        return self.pki / CA_FILE

    @property
    def hub_url(self) -> str:
        """The hub Fleet proxy's base URL."""
        return f"https://127.0.0.1:{self.hub_proxy.port}"


def _forwarder(root: Path, pki: Path, name: str, hub_port: int) -> NginxProxy:
    identity = pki / "node" / name
    tls = issue_server_certificate(
        pki, name=f"{name}-forward", out_dir=root / "forward_tls" / name, hosts=("127.0.0.1",)
    )
    port = free_port()
    workdir = root / "forward" / name
    conf = render_node_forward(
        workdir=workdir,
        local_port=port,
        server_cert=tls / CERT_FILE,
        server_key=tls / KEY_FILE,
        node_cert=identity / CERT_FILE,
        node_key=identity / KEY_FILE,
        ca=pki / CA_FILE,
        hub_address=f"127.0.0.1:{hub_port}",
        hub_name="hub",
    )
    return NginxProxy(f"{name}-fleet-forward", workdir, conf, port)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A loopback SuperLink, the hub's Fleet proxy, and two SuperNodes behind forwarders."""
    root = tmp_path_factory.mktemp("fleet_proxy")
    pki = root / "pki"
    create_ca(pki)
    hub = issue(pki, role=Role.HUB, name="hub")
    for name in NODES:
        issue(pki, role=Role.NODE, name=name)
    issue(pki, role=Role.ANALYST, name="ann")
    # A certificate that is not a node's, whose organisation spells ",OU=node": RFC 2253
    # escapes the comma, and the proxy's pattern must not take it for the node role.
    issue(pki, role=Role.ANALYST, name="eve", organisation="x,OU=node")
    tls = SuperLinkTls.issue(pki, root / "superlink_tls")
    with SuperLink(root / "superlink", tls) as link:
        proxy = hub_fleet_proxy(link, hub, f"127.0.0.1:{free_port()}", root / "hub_proxy")
        started: list[NginxProxy | SuperNodeProcess] = []
        try:
            proxy.start()
            started.append(proxy)
            forwarders = {}
            for name in NODES:
                forwarder = _forwarder(root, pki, name, proxy.port)
                forwarder.start()
                started.append(forwarder)
                forwarders[name] = forwarder
                private, public = make_supernode_key(root / "keys" / name)
                link.register(name, public)
                supernode = SuperNodeProcess(
                    root / "nodes" / name,
                    superlink=f"127.0.0.1:{forwarder.port}",
                    root_certificate=pki / CA_FILE,
                    private_key=private,
                    node_config={"node-name": name, "identity-dir": str(pki / "node" / name)},
                )
                supernode.start()
                started.append(supernode)
            link.wait_online(len(NODES), timeout_s=90)
            yield Federation(root, pki, link, proxy, forwarders)
        finally:
            for process in reversed(started):
                process.stop()


def _client(fed: Federation, identity: str | None) -> httpx.Client:
    """An HTTPS client that trusts the federation CA, with identity's certificate if given."""
    context = ssl.create_default_context(cafile=str(fed.ca))
    if identity is not None:
        folder = next(fed.pki.glob(f"*/{identity}"))
        context.load_cert_chain(folder / CERT_FILE, folder / KEY_FILE)
    return httpx.Client(verify=context, timeout=10)


def test_a_ping_reaches_both_nodes_through_the_proxies(federation: Federation) -> None:
    app_dir = federation.root / "app_ping"
    write_app(app_dir)
    output = federation.root / "ping.json"
    config = {
        "task": "ping",
        "output": str(output),
        "min-nodes": str(len(NODES)),
        "deadline-s": "60",
        "nodes-deadline-s": "60",
    }
    run_app(federation.superlink, app_dir, config, timeout_s=RUN_TIMEOUT_S)
    for _ in range(50):  # `flwr run --stream` can end just before the ServerApp writes
        if output.exists():
            break
        time.sleep(0.2)
    result = json.loads(output.read_text())
    assert result["ok"] is True, result
    assert sorted(r["name"] for r in result["replies"].values()) == sorted(NODES)
    # The Fleet traffic went through both proxies, as each node's certificate.
    hub_log = (federation.hub_proxy.workdir / "access.log").read_text()
    for name in NODES:
        assert f"OU=node,CN={name}" in hub_log
        forward_log = (federation.forwarders[name].workdir / "access.log").read_text()
        assert "POST /v1/fleet/pull-messages 200" in forward_log


def test_a_client_without_a_certificate_is_turned_away(federation: Federation) -> None:
    with _client(federation, None) as client:
        try:
            response = client.post(f"{federation.hub_url}/v1/control/list-runs", content=b"")
        except httpx.TransportError:
            return  # a TLS alert: refused in the handshake
    assert response.status_code == 400
    assert "No required SSL certificate" in response.text


@pytest.mark.parametrize("identity", ["ann", "eve"])
@pytest.mark.parametrize("path", ["/v1/fleet/get-run", "/v1/control/list-runs", "/docs"])
def test_a_certificate_that_is_not_a_node_gets_403(
    federation: Federation, identity: str, path: str
) -> None:
    with _client(federation, identity) as client:
        response = client.post(f"{federation.hub_url}{path}", content=b"")
    assert response.status_code == 403, response.text


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/list-runs",
        "/v1/control/start-run",
        "/v1/runtime/acquire-task",
        "/docs",
        "/openapi.json",
        "/",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
    ],
)
def test_a_node_certificate_reaches_nothing_but_the_fleet_api(
    federation: Federation, path: str
) -> None:
    with _client(federation, "north") as client:
        post = client.post(f"{federation.hub_url}{path}", content=b"")
        get = client.get(f"{federation.hub_url}{path}")
    assert (post.status_code, get.status_code) == (403, 403), (post.text, get.text)


def test_a_node_certificate_on_the_fleet_api_is_forwarded(federation: Federation) -> None:
    with _client(federation, "north") as client:
        response = client.post(f"{federation.hub_url}/v1/fleet/get-run", content=b"")
    # Whatever the SuperLink says of an unsigned, empty request; not the proxy's refusal.
    assert response.status_code != 403, response.text
    assert "forbidden" not in response.text


@pytest.mark.parametrize("via", ["hub proxy", "node forwarder"])
def test_flwr_run_cannot_reach_the_control_api_from_the_network(
    federation: Federation, via: str
) -> None:
    port = federation.hub_proxy.port if via == "hub proxy" else federation.forwarders["north"].port
    home = federation.root / f"outsider_{port}"
    home.mkdir()
    config = {
        "superlink": {
            "default": "outside",
            "outside": {"address": f"127.0.0.1:{port}", "root-certificates": str(federation.ca)},
        }
    }
    (home / "config.toml").write_text(tomli_w.dumps(config))
    app_dir = federation.root / f"app_outsider_{port}"
    write_app(app_dir)
    runs_before = _run_count(federation.superlink)
    done = subprocess.run(
        [str(venv_bin() / "flwr"), "run", str(app_dir), "outside"],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    # The proxy's refusal (403), or the hub's "no client certificate" (400).
    assert "403" in output or "400 Bad Request" in output, output
    assert _run_count(federation.superlink) == runs_before


def _run_count(link: SuperLink) -> int:
    done = link.cli(["ls", link.connection, "--format", "json"])
    listed = json.loads(done.stdout)
    return len(listed.get("runs", []))
