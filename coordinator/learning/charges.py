"""What each node has charged for a fit so far, from its own receipts (FitStepResponse).

Kept by the hub's fit loop over chc's protocol (federated.py) and by the training loop over
Flower (flower/train.py) alike, so a failed fit or run reports its charges the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocols import serde
from protocols.v1 import node_pb2
from queries.model import StepRelease
from queries.results import BudgetStatus


@dataclass
class Charges:
    """Per node: rho charged, latest budget, latest query id, every ledger entry's sequence."""

    rho: dict[str, float] = field(default_factory=dict)
    budget: dict[str, BudgetStatus] = field(default_factory=dict)
    query_id: dict[str, str] = field(default_factory=dict)
    ledger: dict[str, list[int]] = field(default_factory=dict)

    def record(self, node: str, msg: node_pb2.FitStepResponse, release: StepRelease) -> None:
        """One step's receipt from node."""
        self.rho[node] = self.rho.get(node, 0.0) + release.rho
        self.budget[node] = serde.budget_from_proto(msg.budget)
        self.query_id[node] = msg.query_id
        self.ledger.setdefault(node, []).append(msg.ledger_sequence)

    def last_entry(self, node: str) -> int:
        """The sequence number of node's latest entry for this fit (0: none)."""
        entries = self.ledger.get(node)
        return entries[-1] if entries else 0

    def summary(self) -> str:
        """'charged so far (rho): a=..., b=...', for the message of a fit that stopped."""
        if not self.rho:
            return "no node was charged"
        return "charged so far (rho): " + ", ".join(f"{n}={r:.6g}" for n, r in self.rho.items())
