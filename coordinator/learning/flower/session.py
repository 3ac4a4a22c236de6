"""Training a model over Flower from the hub: sign, submit the run, read back the result.

`train_over_flower` signs the model (a ModelSpec with solver "gradient") with the analyst's
identity as a fit envelope, writes the run's code-free app folder (fab.py), submits it to
the SuperLink (launch.py) with the envelope as the run's payload, and reads the ServerApp's
JSON result (train.py): coefficients, per-round training loss, held-out AUC, and what each
node was charged with the ledger entries that record it. `TrainedModel.save` writes that
with the model spec and its provenance, so a saved model says what it cost and where from.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from coordinator.learning.flower.fab import write_app
from coordinator.learning.flower.launch import run_app
from coordinator.learning.flower.superlink import SuperLink
from coordinator.learning.trained import TrainedModel
from protocols import serde
from protocols.security.envelope import Audience, Operation, sign_query
from protocols.security.pki import Identity
from protocols.v1 import node_pb2
from queries.errors import ChcError, ConfigError, QueryError
from queries.model import ModelSpec
from queries.model_io import model_bytes

# `flwr run --stream` can return a moment before the ServerApp's process has written.
RESULT_WAIT_S = 10.0


class TrainingFailedError(ChcError):
    """The run ended without a model: the ServerApp's reason (and any charges) are in it."""

    status_name = "ABORTED"


def sign_training(
    identity: Identity, model: ModelSpec, *, hub: str = "hub", ttl_s: float = 3600.0
) -> node_pb2.QueryEnvelope:
    """The analyst's fit envelope for a training run (operation fit, addressed to the hub)."""
    if model.solver != "gradient":
        raise QueryError("a training run takes a model whose solver is 'gradient'")
    signed = sign_query(
        identity,
        model_bytes(model),
        operation=Operation.FIT,
        audience=Audience(hub=hub),
        ttl_ms=int(ttl_s * 1000),
    )
    return serde.signed_query_to_proto(signed)


def train_over_flower(
    superlink: SuperLink,
    envelope: node_pb2.QueryEnvelope,
    *,
    workdir: Path,
    min_nodes: int,
    step_deadline_s: float = 60.0,
    nodes_deadline_s: float = 60.0,
    timeout_s: float = 900.0,
) -> TrainedModel:
    """Run the signed training on the SuperLink's nodes; the ServerApp's result."""
    if min_nodes < 1:
        raise ConfigError("min_nodes must be at least 1")
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 1_000_000:06d}"
    app_dir = workdir / f"app-{stamp}"
    output = workdir / f"result-{stamp}.json"
    write_app(app_dir)
    config = {
        "task": "train",
        "payload": base64.b64encode(envelope.SerializeToString(deterministic=True)).decode(),
        "output": str(output.resolve()),
        "deadline-s": f"{step_deadline_s:g}",
        "min-nodes": str(min_nodes),
        "nodes-deadline-s": f"{nodes_deadline_s:g}",
    }
    started = time.monotonic()
    run_app(superlink, app_dir, config, timeout_s=timeout_s)
    waited = time.monotonic() + RESULT_WAIT_S
    while not output.exists() and time.monotonic() < waited:
        time.sleep(0.2)
    if not output.exists():
        raise TrainingFailedError(
            f"the run wrote no result ({output}); see the SuperLink log {superlink.log_path}"
        )
    result: dict[str, object] = json.loads(output.read_text())
    if not result.get("ok"):
        raise TrainingFailedError(f"training failed: {result.get('error', 'no reason given')}")
    return TrainedModel(result=result, wall_s=round(time.monotonic() - started, 3))
