"""A test-only hub loop for model fits: signs a model and runs its steps against nodes directly.

The real hub loop is coordinator/learning/; this one is the least that drives the node side
end to end: step 0 at every node, then Newton steps at the summed noisy gradient and Hessian
(a small ridge keeps a noisy Hessian solvable), Gaussian fits solved from X'X and X'y.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from coordinator.local.federation import LocalFederation
from protocols import serde
from protocols.security.envelope import Operation, sign_query
from protocols.security.pki import load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.model import Family, ModelSpec
from queries.model_io import model_bytes


def fit_envelope(
    fed: LocalFederation, model: ModelSpec, operation: Operation = Operation.FIT
) -> node_pb2.QueryEnvelope:
    """The analyst's envelope signed to fit the model (called on the nodes directly)."""
    analyst = load_identity(fed.analyst_identity)
    signed = sign_query(analyst, model_bytes(model), operation=operation)
    return serde.signed_query_to_proto(signed)


def node_stubs(fed: LocalFederation, names: Sequence[str]) -> dict[str, node_pb2_grpc.NodeStub]:
    """A stub per node on the analyst's mTLS identity."""
    analyst = load_identity(fed.analyst_identity)
    return {
        n: node_pb2_grpc.NodeStub(
            secure_channel(f"127.0.0.1:{fed.node_port(n)}", analyst, server_name=n)
        )
        for n in names
    }


def full(triangle: Sequence[float], p: int) -> np.ndarray:
    """A symmetric p x p matrix from its row-major upper triangle."""
    m = np.zeros((p, p))
    m[np.triu_indices(p)] = triangle
    return m + np.triu(m, 1).T


@dataclass
class Fit:
    """What the driver saw: coefficients and every node's responses by step."""

    columns: tuple[str, ...] = ()
    coefficients: np.ndarray = field(default_factory=lambda: np.zeros(0))
    responses: dict[int, dict[str, node_pb2.FitStepResponse]] = field(default_factory=dict)
    sent: dict[int, list[float]] = field(default_factory=dict)  # the coefficients of each step


def step(
    stubs: dict[str, node_pb2_grpc.NodeStub],
    envelope: node_pb2.QueryEnvelope,
    k: int,
    coefficients: Sequence[float],
    regions: Sequence[str] | None = None,
) -> dict[str, node_pb2.FitStepResponse]:
    """Step k at every node (raises the first node's grpc.RpcError); regions: the stubs'."""
    regions = list(stubs) if regions is None else list(regions)
    return {
        name: stub.FitStep(
            node_pb2.FitStepRequest(
                envelope=envelope, step=k, coefficients=list(coefficients), regions=regions
            ),
            timeout=60,
        )
        for name, stub in stubs.items()
    }


def vectors(r: node_pb2.FitStepResponse) -> dict[str, np.ndarray]:
    """A response's vectors by name."""
    return {v.name: np.asarray(v.values) for v in r.statistics}


def run_fit(
    stubs: dict[str, node_pb2_grpc.NodeStub], envelope: node_pb2.QueryEnvelope, model: ModelSpec
) -> Fit:
    """Every step of the fit at every node, solving between them as the hub would."""
    fit = Fit()
    fit.responses[0] = step(stubs, envelope, 0, [])
    first = next(iter(fit.responses[0].values()))
    fit.columns = tuple(first.columns)
    p = len(fit.columns)
    b = np.zeros(p)
    for k in range(1, model.steps):
        coefficients = [] if model.family is Family.GAUSSIAN else [float(x) for x in b]
        fit.sent[k] = coefficients
        fit.responses[k] = step(stubs, envelope, k, coefficients)
        summed: dict[str, np.ndarray] = {}
        for r in fit.responses[k].values():
            for name, v in vectors(r).items():
                summed[name] = summed.get(name, 0) + v
        if model.family is Family.GAUSSIAN:
            b = np.linalg.solve(full(summed["xtx"], p) + 1e-9 * np.eye(p), summed["xty"])
        else:
            h = full(summed["hessian"], p)
            b = b + np.linalg.solve(h + 1e-9 * np.trace(h) / p * np.eye(p), summed["gradient"])
    fit.coefficients = b
    return fit


def code_of(call: object) -> grpc.StatusCode:
    """The status code of a call that raised grpc.RpcError."""
    assert isinstance(call, grpc.RpcError)
    return call.code()  # type: ignore[no-any-return, attr-defined]
