"""`Federation`: the analysts' Python API to the hub."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import grpc

from protocols import serde
from protocols.errors import (
    AuthenticationError,
    BudgetExceededError,
    ChcError,
    ConfigError,
    PermissionDeniedError,
    QueryError,
)
from protocols.security import Identity, load_identity, secure_channel, sign_query
from protocols.v1 import hub_pb2, hub_pb2_grpc
from queries.results import FederatedResult, NodeDescription, NodeExplain, NodeOutcome
from queries.spec import Query, canonical_bytes


class HubUnavailableError(ConnectionError, ChcError):
    """The hub could not be reached or did not answer in time."""


_ERRORS: dict[grpc.StatusCode, type[ChcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: QueryError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: BudgetExceededError,
    grpc.StatusCode.FAILED_PRECONDITION: ConfigError,
    grpc.StatusCode.UNAVAILABLE: HubUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: HubUnavailableError,
}


def _raise_from(exc: grpc.RpcError, hub: str) -> ChcError:
    call = exc if isinstance(exc, grpc.Call) else None
    code = call.code() if call is not None else grpc.StatusCode.UNKNOWN
    details = (call.details() if call is not None else None) or code.name
    if code is grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach the hub at {hub}: {details}"
    return _ERRORS.get(code, ChcError)(details)


class Federation:
    """A connection to the hub as one analyst; every query is signed with the analyst's key."""

    def __init__(self, hub: str, identity: Identity | Path, *, server_name: str = "hub") -> None:
        self.hub = hub
        self.identity = identity if isinstance(identity, Identity) else load_identity(identity)
        self._channel = secure_channel(hub, self.identity, server_name=server_name)
        self._stub = hub_pb2_grpc.HubStub(self._channel)

    def query(
        self, query: Query, *, deadline_s: float = 30.0, ttl_s: float = 600.0
    ) -> FederatedResult:
        """Sign a query, run it at every node, and return per-region and pooled estimates."""
        signed = sign_query(self.identity, canonical_bytes(query), ttl_ms=int(ttl_s * 1000))
        request = hub_pb2.SubmitRequest(
            envelope=serde.signed_query_to_proto(signed), deadline_ms=int(deadline_s * 1000)
        )
        try:
            # Give the hub a little longer than the nodes, so node timeouts are reported.
            response = self._stub.Submit(request, timeout=deadline_s + 5.0)
        except grpc.RpcError as exc:
            raise _raise_from(exc, self.hub) from None
        return serde.result_from_proto(response)

    def explain(self, query: Query, *, deadline_s: float = 30.0) -> list[NodeExplain]:
        """Each node's plan, cost and expected noise for a query; runs nothing, spends nothing."""
        signed = sign_query(self.identity, canonical_bytes(query))
        request = hub_pb2.SubmitRequest(
            envelope=serde.signed_query_to_proto(signed), deadline_ms=int(deadline_s * 1000)
        )
        try:
            response = self._stub.Explain(request, timeout=deadline_s + 5.0)
        except grpc.RpcError as exc:
            raise _raise_from(exc, self.hub) from None
        return [serde.explain_from_proto(n) for n in response.nodes]

    def nodes(self, *, timeout_s: float = 30.0) -> tuple[list[NodeDescription], list[NodeOutcome]]:
        """Every node's public catalog and budget, and the nodes that did not answer."""
        try:
            response = self._stub.ListNodes(hub_pb2.ListNodesRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _raise_from(exc, self.hub) from None
        return (
            [serde.description_from_proto(n) for n in response.nodes],
            [serde.outcome_from_proto(o) for o in response.unavailable],
        )

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()

    def __enter__(self) -> Federation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
