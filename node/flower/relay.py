"""The node's Flower handlers: a fit step from the hub's ServerApp, relayed to the node itself.

The ClientApp process Flower starts for a message holds no budget, no ledger and no data: it
passes the FitStepRequest (an analyst-signed fit envelope, the step, the hub's coefficients)
to this node's own gRPC service over mutual TLS with the node's own certificate, and returns
the node's FitStepResponse. So a round trained over Flower is verified, planned, charged in
the node's one ledger and noised by the same code as a fit over chc's own protocol
(node/fitting.py), and refused for the same reasons. node_config (the SuperNode's
--node-config, set by the node's custodian, never by the hub) says where the node is:
`node-address` and `identity-dir`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import grpc

from protocols.security.pki import load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.errors import ChcError, ConfigError, DataError

# A step's own deadline is the node's (its FitStep checks the call's deadline); this bounds
# the relay if the node does not answer at all.
STEP_TIMEOUT_S = 120.0


class RelayRefusalError(ChcError):
    """The node refused the step; its gRPC status and message, relayed unchanged."""


def _config(node_config: Mapping[str, str], key: str) -> str:
    value = str(node_config.get(key, "")).strip()
    if not value:
        raise ConfigError(
            f"the SuperNode's --node-config has no {key!r}; the node's supervisor sets "
            "node-address and identity-dir"
        )
    return value


def fit_step(payload: bytes, node_config: Mapping[str, str]) -> bytes:
    """Relay one FitStepRequest to this node's FitStep; its FitStepResponse, serialized."""
    try:
        request = node_pb2.FitStepRequest.FromString(payload)
    except Exception:
        raise DataError("the fit-step message is not a FitStepRequest") from None
    identity = load_identity(Path(_config(node_config, "identity-dir")))
    address = _config(node_config, "node-address")
    channel = secure_channel(address, identity, server_name=identity.name)
    try:
        response = node_pb2_grpc.NodeStub(channel).FitStep(request, timeout=STEP_TIMEOUT_S)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else ""
        name = code.name if code is not None else "UNKNOWN"
        refusal = RelayRefusalError(f"{name}: {details}")
        refusal.status_name = name
        raise refusal from None
    finally:
        channel.close()
    return response.SerializeToString(deterministic=True)


HANDLERS = {"fit-step": fit_step}
