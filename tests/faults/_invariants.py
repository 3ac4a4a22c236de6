"""What must hold after any fault: each a check the fault tests share.

- no charge lost: every release an analyst received has its `released` entry in the node's
  ledger (same query id, same rho), so no release left without a charge;
- no charge doubled: no envelope is charged twice at one node (a retried or resent envelope
  returns the stored release, or is refused: never a second charge);
- the ledger verifies (chain, signatures, head, envelopes against the CA);
- every charge is visible: what `chc budget` says was spent is what the ledger holds;
- the analyst heard back in time: within the deadline and a small margin.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.audit.sources import open_file
from coordinator.audit.verification import Verification, verify
from coordinator.local.federation import LocalFederation
from protocols.security.pki import CA_FILE
from protocols.v1 import node_pb2
from queries.results import FederatedResult, NodeStatus

# How much later than its deadline an analyst may hear back: the hub's combining and the
# client's own work, on a 2-core machine shared with other test runs.
DEADLINE_MARGIN_S = 2.0


@dataclass(frozen=True)
class Receipt:
    """One release an analyst received: the node's query id and ledger entry, and its cost."""

    node: str
    query_id: str
    sequence: int
    rho: float
    analyst: str = ""


def receipts(result: FederatedResult, analyst: str = "") -> list[Receipt]:
    """The releases in a federated result (the nodes that answered OK)."""
    return [
        Receipt(o.node, o.node_query_id, o.ledger_sequence, o.rho_charged, analyst)
        for o in result.nodes
        if o.status is NodeStatus.OK
    ]


def ledger_bodies(path: Path) -> dict[int, dict[str, Any]]:
    """Every entry of a ledger file (not its head), by sequence number."""
    return {e.sequence: json.loads(e.body) for e in open_file(path).read() if not e.head}


def nonce_of(body: dict[str, Any]) -> bytes:
    """The envelope nonce a released entry records."""
    envelope = node_pb2.QueryEnvelope.FromString(base64.b64decode(body["envelope"]))
    return envelope.nonce


def released(bodies: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The released query entries (policy entries and refusals left out)."""
    return [b for b in bodies.values() if b.get("outcome") == "released"]


def check_ledger(fed: LocalFederation, node: str, got: Iterable[Receipt]) -> Verification:
    """The node's ledger verifies, holds every receipt once, and charges no envelope twice."""
    path = fed.ledger_path(node)
    result = verify(open_file(path), ca_pem=(fed.pki / CA_FILE).read_bytes())
    assert result.ok, f"{node}: " + "; ".join(str(a) for a in result.anomalies)
    bodies = ledger_bodies(path)
    sequence_of: dict[str, int] = {}
    for r in got:
        assert r.node == node
        body = bodies.get(r.sequence)
        assert body is not None, f"{node}: release {r.query_id} (#{r.sequence}) has no entry"
        assert body["outcome"] == "released", (node, r, body["outcome"])
        assert body["query_id"] == r.query_id, (node, r, body["query_id"])
        assert abs(body["rho"] - r.rho) <= 1e-12 * max(1.0, r.rho), (node, r, body["rho"])
        # A release received twice (resent) is the same entry, never a second one.
        assert sequence_of.setdefault(r.query_id, r.sequence) == r.sequence
    charged = Counter(nonce_of(b) for b in released(bodies))
    doubled = [n.hex() for n, count in charged.items() if count > 1]
    assert not doubled, f"{node}: envelope(s) charged more than once: {doubled}"
    return result


def by_node(got: Iterable[Receipt]) -> dict[str, list[Receipt]]:
    """Receipts grouped by node."""
    out: dict[str, list[Receipt]] = defaultdict(list)
    for r in got:
        out[r.node].append(r)
    return out


def check_all(fed: LocalFederation, got: Iterable[Receipt]) -> dict[str, Verification]:
    """check_ledger at every node of the federation."""
    grouped = by_node(got)
    return {s.name: check_ledger(fed, s.name, grouped.get(s.name, ())) for s in fed.nodes}


def chc_budget(fed: LocalFederation, identity: Path) -> dict[str, dict[str, Any]]:
    """`chc budget --json` as the analyst of identity sees it, by node (a real subprocess)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator",
            "budget",
            "--hub",
            fed.hub_address,
            "--identity",
            str(identity),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return {b["node"]: b for b in json.loads(done.stdout)}


def check_budget_matches_ledgers(
    fed: LocalFederation, identity: Path, analyst: str, *, nodes: Iterable[str] | None = None
) -> None:
    """What `chc budget` shows spent at each node is the sum of its ledger's released rho."""
    shown = chc_budget(fed, identity)
    for name in nodes if nodes is not None else (s.name for s in fed.nodes):
        rows = released(ledger_bodies(fed.ledger_path(name)))
        total = sum(b["rho"] for b in rows)
        mine = sum(b["rho"] for b in rows if b["analyst"] == analyst)
        assert shown[name]["status"] == "ok", shown[name]
        assert abs(shown[name]["rho_spent"] - total) <= 1e-9, (name, shown[name], total)
        assert abs(shown[name]["your_rho_spent"] - mine) <= 1e-9, (name, shown[name], mine)
