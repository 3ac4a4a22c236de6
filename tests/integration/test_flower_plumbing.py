"""Flower's Deployment Engine on loopback: a TLS SuperLink with node auth and two SuperNodes.

One federation per module (it takes ~10 s to come up on 2 cores); each test submits a run
with `flwr run` and reads the ServerApp's JSON result.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.learning.flower.fab import write_app
from coordinator.learning.flower.launch import run_app
from coordinator.learning.flower.superlink import SuperLink, SuperLinkTls
from node.flower.supernode import SuperNodeProcess, make_supernode_key
from protocols.flower_process import FlowerStartError
from protocols.security.pki import CA_FILE, create_ca

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

NODES = ("north", "south")
RUN_TIMEOUT_S = 120.0


@dataclass
class Federation:
    """The running processes and where they write."""

    root: Path
    superlink: SuperLink
    supernodes: dict[str, SuperNodeProcess]
    ca: Path


def _supernode(root: Path, name: str, link: SuperLink, ca: Path) -> SuperNodeProcess:
    identity = root / "identities" / name
    private, _ = make_supernode_key(identity)
    return SuperNodeProcess(
        root / "nodes" / name,
        superlink=link.address,
        root_certificate=ca,
        private_key=private,
        node_config={"node-name": name, "identity-dir": str(identity)},
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A SuperLink and two registered SuperNodes, all online."""
    root = tmp_path_factory.mktemp("flower")
    create_ca(root / "pki")
    tls = SuperLinkTls.issue(root / "pki", root / "superlink_tls")
    ca = root / "pki" / CA_FILE
    with SuperLink(root / "superlink", tls) as link:
        supernodes: dict[str, SuperNodeProcess] = {}
        try:
            for name in NODES:
                node = _supernode(root, name, link, ca)
                link.register(name, node.private_key.with_suffix(".pub"))
                node.start()
                supernodes[name] = node
            link.wait_online(len(NODES), timeout_s=90)
            yield Federation(root, link, supernodes, ca)
        finally:
            for node in supernodes.values():
                node.stop()


def _run(fed: Federation, app_dir: Path, name: str) -> dict[str, object]:
    output = fed.root / f"{name}.json"
    config = {
        "task": "ping",
        "output": str(output),
        "min-nodes": str(len(NODES)),
        "deadline-s": "60",
        "nodes-deadline-s": "60",
    }
    run_app(fed.superlink, app_dir, config, timeout_s=RUN_TIMEOUT_S)
    # `flwr run --stream` can end a moment before the ServerApp's process has written.
    for _ in range(50):
        if output.exists():
            break
        time.sleep(0.2)
    result: dict[str, object] = json.loads(output.read_text())
    return result


def test_both_nodes_answer_a_ping_with_their_names(federation: Federation) -> None:
    app_dir = federation.root / "app_ping"
    write_app(app_dir)
    started = time.monotonic()
    result = _run(federation, app_dir, "ping")
    assert time.monotonic() - started < RUN_TIMEOUT_S
    assert result["ok"] is True, result
    replies = result["replies"]
    assert isinstance(replies, dict)
    assert len(replies) == len(NODES)
    assert sorted(r["name"] for r in replies.values()) == sorted(NODES)
    assert {r["fab_check"] for r in replies.values()} == {"pyproject-only"}
    exchanges = result["exchanges"]
    assert isinstance(exchanges, list)
    (exchange,) = exchanges
    assert exchange["kind"] == "ping"
    assert exchange["wall_s"] < 60


def test_a_fab_carrying_code_is_refused_at_every_node(federation: Federation) -> None:
    app_dir = federation.root / "app_code"
    write_app(app_dir)
    (app_dir / "helper.py").write_text("print('code from the hub')\n")
    result = _run(federation, app_dir, "code")
    assert result["ok"] is True, result
    replies = result["replies"]
    assert isinstance(replies, dict)
    assert len(replies) == len(NODES)
    for reply in replies.values():
        assert reply["ok"] is False
        assert reply["error_code"] == 2  # Flower's "ClientApp raised": the check ran there
        assert "carries code ('helper.py')" in reply["reason"]
    refused = next(iter(replies.values()))["reason"].split()[1]  # "FAB <sha256[:12]> ..."
    for node in federation.supernodes.values():
        # Refused before the unpack step: Flower names an app folder by the FAB's hash.
        apps = node.workdir / "flwr_home" / "apps"
        assert not list(apps.glob(f"*.{refused[:8]}")), list(apps.iterdir())


def test_an_unregistered_supernode_is_not_served(federation: Federation) -> None:
    stranger = _supernode(federation.root, "stranger", federation.superlink, federation.ca)
    # It may give up before its own runtime API is even listening.
    with contextlib.suppress(FlowerStartError):
        stranger.start()
    try:
        deadline = time.monotonic() + 60
        while stranger.exited() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert stranger.exited() is not None, "an unregistered SuperNode kept running"
        online = [
            n for n in federation.superlink.nodes() if str(n.get("status", "")).lower() == "online"
        ]
        assert len(online) == len(NODES)
    finally:
        stranger.stop()
    log = (stranger.logs / "supernode.log").read_text(errors="replace")
    assert "Failed to activate SuperNode" in log
