"""A real `chc-node serve` process of a test's own: its options, ports, log and exit code.

LocalFederation supplies the PKI; the node runs with the options the test gives
(--log-level DEBUG, --log-format json, listeners), so the test owns its pid and exit code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import grpc
import tomli_w

from coordinator.local.federation import LocalFederation, NodeSetup
from protocols import serde
from protocols.observability.health import check
from protocols.process import read_ready_file
from protocols.revocation import CRL_FILE
from protocols.security.envelope import sign_query
from protocols.security.pki import Identity, Role, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.spec import Query, canonical_bytes

_NODE = (sys.executable, "-m", "node", "serve")
_LOG_OPTIONS = ("--log-level", "DEBUG")


@dataclass
class NodeProcess:
    """One running node and what a test needs to reach and judge it."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ledger: Path
    port: int
    metrics_port: int
    health_port: int
    analyst: Identity

    def channel(self) -> grpc.Channel:
        """A fresh mutual-TLS channel to the node, as the demo analyst."""
        return secure_channel(f"127.0.0.1:{self.port}", self.analyst, server_name=self.name)

    def execute(self, channel: grpc.Channel, query: Query) -> node_pb2.ExecuteResponse:
        """Sign and run one query at the node."""
        envelope = serde.signed_query_to_proto(sign_query(self.analyst, canonical_bytes(query)))
        request = node_pb2.ExecuteRequest(envelope=envelope)
        reply: node_pb2.ExecuteResponse = node_pb2_grpc.NodeStub(channel).Execute(
            request, timeout=120
        )
        return reply

    def health(self, service: str = "") -> str:
        """The status the plaintext health listener reports."""
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as probe:
            return check(probe, service, timeout=5)

    def scrape(self) -> str:
        """The node's /metrics page."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    def log_lines(self) -> list[dict[str, object]]:
        """Every JSON line of the node's log (a line that is not JSON fails the test)."""
        lines = self.log.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def start_node(
    root: Path, omop: Path, *, name: str = "nwc", grace_s: float = 60.0, total_rho: float = 1e6
) -> NodeProcess:
    """Issue the PKI (LocalFederation's), write node.toml and start `chc-node serve`."""
    setup = NodeSetup(name=name, omop=omop)
    fed = LocalFederation(workdir=root, nodes=(setup,))
    fed.create_pki()
    ledger = root / "conf" / f"{name}.ledger.sqlite"
    ledger.parent.mkdir(parents=True, exist_ok=True)
    table = {
        "name": name,
        "omop": str(omop.resolve()),
        "identity": str(fed.identity_dir(Role.NODE, name).resolve()),
        "crl": str((fed.pki / CRL_FILE).resolve()),
        "listen": "127.0.0.1:0",
        "ledger": str(ledger),
        "reference_date": date(2025, 12, 31),
        "log_format": "json",
        "metrics_listen": "127.0.0.1:0",
        "health_listen": "127.0.0.1:0",
        "drain_grace_s": grace_s,
        "budget": {"total_rho": total_rho, "max_rho_per_query": 10.0},
    }
    config = root / "conf" / f"{name}.toml"
    config.write_text(tomli_w.dumps(table), encoding="utf-8")
    ready, log = root / f"{name}.ready", root / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [*_NODE, "--config", str(config), *_LOG_OPTIONS, "--ready-file", str(ready)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while (info := read_ready_file(ready)) is None:
        if popen.poll() is not None:
            raise AssertionError(f"node exited {popen.returncode}: {log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, "node did not start within 120 s"
        time.sleep(0.05)
    return NodeProcess(
        name=name,
        popen=popen,
        log=log,
        ledger=ledger,
        port=int(str(info["port"])),
        metrics_port=int(str(info["metrics_port"])),
        health_port=int(str(info["health_port"])),
        analyst=load_identity(fed.analyst_identity),
    )


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value in a Prometheus text page (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0
