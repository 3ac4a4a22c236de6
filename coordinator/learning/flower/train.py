"""The ServerApp's "train" task: a gradient-descent fit over Flower, each round a fit step.

The run's payload is the analyst's signed fit envelope (operation fit; a ModelSpec with
solver "gradient"). Each step goes to every node as a "fit-step" message holding a
FitStepRequest; the node's ClientApp relays it to the node's own FitStep (node/flower/
relay.py), which verifies the analyst's signature, plans, charges the node's ledger and only
then releases the step's noisy vectors. So the hub learns nothing a chc fit would not give
it, and every round is one entry in every node's ledger, keyed by the envelope and the step.

As in a fit over chc's own protocol (coordinator/learning/federated.py): a node that refuses
the design check or does not answer it is left out and the result is partial; after it, any
node's failure stops the training (a round from some nodes only would be biased, and going
on would charge the others for a model nobody gets), with what was charged so far.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid

from coordinator.learning.charges import Charges
from coordinator.learning.descent import descend, descend_network, held_out_auc
from coordinator.learning.flower.server_app import (
    Reply,
    exchange,
    online_nodes,
    payload_of,
    run_config,
    seconds_of,
)
from protocols import serde_fit
from protocols.v1 import node_pb2
from queries.errors import ChcError, ConfigError, DataError
from queries.model import ModelSpec, StepRelease
from queries.model_io import model_bytes, model_from_json


class TrainingStoppedError(ChcError):
    """A node failed after the design check: training stopped, nothing more is charged."""

    status_name = "ABORTED"


def _names(
    grid: Grid, nodes: Sequence[int], deadline_s: float
) -> tuple[dict[int, str], dict[int, str]]:
    """Each answering node's name (its custodian's node-name), and why the others did not.

    A SuperNode that restarted is listed twice until its old registration's heartbeat
    expires; the old one fails the ping, before anything is charged, and is not in the run.
    """
    replies = exchange(grid, dict.fromkeys(nodes, b""), "ping", deadline_s)
    names: dict[int, str] = {}
    unreachable: dict[int, str] = {}
    for nid, reply in replies.items():
        if reply.payload is None:
            unreachable[nid] = reply.reason or f"error {reply.error_code}"
            continue
        try:
            name = str(json.loads(reply.payload).get("node") or "")
        except (UnicodeDecodeError, json.JSONDecodeError):
            name = ""
        names[nid] = name or f"flower-node-{nid}"
    return names, unreachable


def _answering(
    grid: Grid, want: int, nodes_deadline_s: float, deadline_s: float
) -> tuple[dict[int, str], dict[int, str]]:
    """Nodes that answer a ping: at least `want` of them, or those there are by the deadline."""
    give_up = time.monotonic() + nodes_deadline_s
    while True:
        ids = online_nodes(grid, want, max(give_up - time.monotonic(), 0.0))
        names, unreachable = _names(grid, ids, deadline_s) if ids else ({}, {})
        if len(names) >= want or time.monotonic() >= give_up:
            return names, unreachable
        time.sleep(1.0)


class _Steps:
    """Sends fit steps and keeps each node's charges (from its own receipts)."""

    def __init__(self, grid: Grid, envelope: node_pb2.QueryEnvelope, names: dict[int, str]):
        self.grid = grid
        self.envelope = envelope
        self.names = names
        self.charges = Charges()
        self.wall: list[dict[str, Any]] = []

    def send(
        self, nodes: Sequence[int], step: int, coefficients: Sequence[float], deadline_s: float
    ) -> tuple[dict[int, StepRelease], dict[int, Reply]]:
        request = node_pb2.FitStepRequest(
            envelope=self.envelope, step=step, coefficients=list(coefficients), regions=[]
        ).SerializeToString(deterministic=True)
        started = time.monotonic()
        replies = exchange(self.grid, dict.fromkeys(nodes, request), "fit-step", deadline_s)
        self.wall.append({"step": step, "wall_s": round(time.monotonic() - started, 3)})
        released: dict[int, StepRelease] = {}
        failed: dict[int, Reply] = {}
        for nid, reply in replies.items():
            if reply.payload is None:
                failed[nid] = reply
                continue
            msg = node_pb2.FitStepResponse.FromString(reply.payload)
            release = serde_fit.step_release_from_proto(msg, self.names[nid])
            if release.step != step:
                raise DataError(f"node {self.names[nid]} answered step {release.step}")
            self.charges.record(self.names[nid], msg, release)
            released[nid] = release
        return released, failed


def _why(reply: Reply) -> str:
    return reply.reason or f"error {reply.error_code}"


def train(grid: Grid, context: Context) -> dict[str, Any]:
    """Train the signed model at every online node; the result and its provenance."""
    config = run_config(context)
    envelope = node_pb2.QueryEnvelope.FromString(payload_of(config))
    # Parsed for solving only; every node verifies the envelope and plans it itself.
    model: ModelSpec = model_from_json(envelope.query)
    if model.solver != "gradient":
        raise ConfigError("the train task trains models whose solver is 'gradient'")
    deadline = seconds_of(config, "deadline-s")
    names, unreachable = _answering(
        grid, int(config.get("min-nodes", "1")), seconds_of(config, "nodes-deadline-s"), deadline
    )
    nodes = sorted(names)
    if not nodes:
        raise ConfigError(
            "no SuperNode answered: "
            + "; ".join(f"node {n}: {why}" for n, why in unreachable.items())
        )
    steps = _Steps(grid, envelope, names)
    design, refused = steps.send(nodes, 0, (), deadline)
    if not design:
        raise ConfigError(
            "every node refused the design check: "
            + "; ".join(f"{names[n]}: {_why(r)}" for n, r in refused.items())
        )
    fitting = sorted(design)
    plan_nonzero = _nonzero(model)

    def ask(k: int, b: Sequence[float]) -> list[StepRelease]:
        released, failed = steps.send(fitting, k, b, deadline)
        if failed:
            raise TrainingStoppedError(
                f"training stopped at step {k} of {model.steps - 1}: "
                + "; ".join(f"node {names[n]} ({_why(r)})" for n, r in failed.items())
                + f"; {steps.charges.summary()}; nothing more is charged, and the steps already "
                "charged stay in each node's ledger"
            )
        return [released[n] for n in fitting]

    releases = [design[n] for n in fitting]
    result = (
        descend_network(model, releases, ask)
        if model.hidden
        else descend(model, releases, plan_nonzero, ask)
    )
    evaluation = ask(model.steps - 1, (*result.coefficients, *result.score_range))
    auc, auc_sd, held = held_out_auc(evaluation)
    return {
        "model": model.to_dict(),
        "query_sha256": hashlib.sha256(model_bytes(model)).hexdigest(),
        "envelope_nonce": envelope.nonce.hex(),
        "coefficients": dict(zip(result.columns, result.coefficients, strict=True)),
        "rounds": [
            {"round": r.round, "loss": r.loss, "step_norm": r.step_norm} for r in result.rounds
        ],
        "held_out_auc": auc,
        "held_out_auc_noise_sd": auc_sd,
        "score_range": list(result.score_range),
        "held_out_persons": held,
        "training_persons": result.persons,
        "partial": bool(refused),
        "left_out": {names[n]: _why(r) for n, r in refused.items()},
        "unreachable_at_start": {str(n): why for n, why in unreachable.items()},
        "nodes": [
            {
                "node": names[n],
                "flower_node_id": n,
                "rho_charged": steps.charges.rho.get(names[n], 0.0),
                "ledger_sequences": steps.charges.ledger.get(names[n], []),
            }
            for n in nodes
        ],
        "steps": steps.wall,
    }


def _nonzero(model: ModelSpec) -> int:
    """q: the intercept, one level per category and each number (an upper bound the hub
    knows without the catalog: every covariate adds at most one entry that is not 0)."""
    return 1 + len(model.covariates)
