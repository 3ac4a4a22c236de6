"""The hub's gRPC servicer: relays analysts' signed queries to every node and combines them."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence

import grpc
from cryptography import x509

from coordinator.hub.fanout import Reply, fan_out, unanimous_refusal
from coordinator.hub.registry import Registry
from coordinator.learning.federated import fit_across
from coordinator.learning.trained import TrainedModel
from protocols import serde, serde_fit
from protocols.observability.metrics import combine_timer
from protocols.revocation import RevocationList
from protocols.rpc import guarded
from protocols.security.envelope import Call, check_operation, check_payload_version
from protocols.security.pki import Role
from protocols.security.tls import peer_of
from protocols.v1 import hub_pb2, hub_pb2_grpc, node_pb2
from queries import combine, spec, spec_io
from queries import release as release_rules
from queries.errors import (
    AuthenticationError,
    ChcError,
    PermissionDeniedError,
    QueryError,
    QuorumNotMetError,
)
from queries.model_io import is_model, model_from_json
from queries.results import FederatedResult, NodeOutcome, NodeRelease, NodeStatus, ReleaseRules

log = logging.getLogger(__name__)

# The longest an analyst may ask the hub to wait.
MAX_DEADLINE_MS = 10 * 60 * 1000
# What the hub keeps of the caller's own deadline to combine and answer.
COMBINE_MARGIN_S = 0.5


class AllNodesRefusedError(ChcError):
    """Every node refused the query for the same kind of reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status_name = code.name


class TrainingUnavailableError(ChcError):
    """The hub has no SuperLink: training over Flower is not set up here."""

    status_name = "FAILED_PRECONDITION"


class HubService(hub_pb2_grpc.HubServicer):
    """Fan-out, quorum reporting and combination; it cannot forge or alter a query."""

    def __init__(
        self,
        registry: Registry,
        *,
        deadline_ms: int,
        require_tls: bool = True,
        rules: ReleaseRules | None = None,
        revocations: RevocationList | None = None,
        trainer: Callable[[node_pb2.QueryEnvelope], TrainedModel] | None = None,
    ) -> None:
        self.registry = registry
        # Training over Flower ([learning] in hub.toml; None: this hub trains nothing).
        self.trainer = trainer
        self.rules = rules or ReleaseRules()
        self.revocations = revocations
        self.deadline_ms = deadline_ms
        self.require_tls = require_tls

    def _is_revoked(self, cert: x509.Certificate) -> bool:
        return self.revocations is not None and self.revocations.is_revoked(cert)

    def _deadline_s(
        self, request: hub_pb2.SubmitRequest, context: grpc.ServicerContext | None = None
    ) -> float:
        """The analyst's deadline if given (capped), else the hub's default; never past the
        caller's own gRPC deadline (a retried Submit has less time left than it asks for)."""
        if request.deadline_ms < 0:
            # Refused before any node is asked: a deadline in the past can only time out.
            raise QueryError(
                f"deadline_ms must be positive (or 0 for the hub's default of "
                f"{self.deadline_ms} ms), got {request.deadline_ms}"
            )
        asked = min(request.deadline_ms or self.deadline_ms, MAX_DEADLINE_MS) / 1000
        remaining = None if context is None else context.time_remaining()
        if remaining is not None:
            # Leave the hub a moment to combine and answer before the caller gives up.
            asked = max(0.001, min(asked, remaining - COMBINE_MARGIN_S))
        return asked

    def _quorum(self, request: hub_pb2.SubmitRequest) -> int:
        """The analyst's quorum, refused before any node is asked if no result could meet it."""
        n = len(self.registry.handles)
        if request.quorum > n:
            raise QueryError(
                f"quorum: {request.quorum} nodes must answer, but this hub has {n}; ask for at "
                f"most {n} (or 0 to accept any number, with partial results)"
            )
        return int(request.quorum)

    def _check_analyst(self, request: hub_pb2.SubmitRequest, context: grpc.ServicerContext) -> None:
        if not self.require_tls:
            return
        peer = peer_of(context, is_revoked=self._is_revoked)
        if peer.role is not Role.ANALYST:
            raise PermissionDeniedError(
                f"{peer.name} has role {peer.role.value}; only analysts submit queries"
            )
        if peer.name != request.envelope.analyst:
            raise AuthenticationError("the envelope must be signed by the connected analyst")

    @guarded
    def Submit(  # noqa: N802 - gRPC method name
        self, request: hub_pb2.SubmitRequest, context: grpc.ServicerContext
    ) -> hub_pb2.SubmitResponse:
        """Relay one signed query to every node and combine the releases."""
        self._check_analyst(request, context)
        _check_signed_for(request.envelope, Call.EXECUTE)
        # Parse for combining only; every node validates and verifies the envelope itself.
        query = spec_io.from_json(request.envelope.query)
        quorum = self._quorum(request)
        deadline_s = self._deadline_s(request, context)
        node_request = node_pb2.ExecuteRequest(envelope=request.envelope)
        replies = fan_out(self.registry.handles, "Execute", node_request, deadline_s=deadline_s)
        result = _combine(
            query, replies, self.rules, analyst=request.envelope.analyst, quorum=quorum
        )
        return serde.result_to_proto(result)

    @guarded
    def Explain(  # noqa: N802 - gRPC method name
        self, request: hub_pb2.SubmitRequest, context: grpc.ServicerContext
    ) -> hub_pb2.ExplainFederatedResponse:
        """Relay a signed query to every node's Explain; nothing is run or spent."""
        self._check_analyst(request, context)
        _check_signed_for(request.envelope, Call.EXPLAIN)
        node_request = node_pb2.ExecuteRequest(envelope=request.envelope)
        if is_model(request.envelope.query):
            # A model is relayed as a query is, with every node in the hub's order: the
            # design's region columns depend on it, as at every step of the fit.
            model_from_json(request.envelope.query)
            node_request.regions.extend(h.entry.name for h in self.registry.handles)
        else:
            spec_io.from_json(request.envelope.query)
        replies = fan_out(
            self.registry.handles,
            "Explain",
            node_request,
            deadline_s=self._deadline_s(request, context),
        )
        response = hub_pb2.ExplainFederatedResponse()
        for r in replies:
            item = hub_pb2.ExplainResult(node=r.node, status=r.status.value, message=r.message)
            if r.status is NodeStatus.OK and isinstance(r.value, node_pb2.ExplainResponse):
                item.explain.CopyFrom(r.value)
            response.nodes.append(item)
        return response

    @guarded
    def Fit(  # noqa: N802 - gRPC method name
        self, request: hub_pb2.SubmitRequest, context: grpc.ServicerContext
    ) -> hub_pb2.FitResponse:
        """Fit an analyst-signed model across the nodes: each step fanned out and summed."""
        self._check_analyst(request, context)
        _check_signed_for(request.envelope, Call.FIT)
        # Parsed for solving only; every node validates and verifies the envelope itself.
        model = model_from_json(request.envelope.query)
        fitted = fit_across(
            self.registry.handles,
            request.envelope,
            model,
            deadline_s=self._deadline_s(request),
            analyst=request.envelope.analyst,
            rules=self.rules,
        )
        return serde_fit.fitted_to_proto(fitted)

    @guarded
    def Train(  # noqa: N802 - gRPC method name
        self, request: hub_pb2.SubmitRequest, context: grpc.ServicerContext
    ) -> hub_pb2.TrainResponse:
        """Train an analyst-signed model over the hub's SuperLink (docs/training.md)."""
        self._check_analyst(request, context)
        _check_signed_for(request.envelope, Call.FIT)
        model = model_from_json(request.envelope.query)
        if model.solver != "gradient":
            raise QueryError(
                f"solver: Train runs models whose solver is 'gradient', not {model.solver!r} "
                "(a Newton model is fitted with Fit, over chc's own protocol)"
            )
        if self.trainer is None:
            raise TrainingUnavailableError(
                "this hub trains no models over Flower: its hub.toml has no [learning] "
                "section (docs/training.md)"
            )
        trained = self.trainer(request.envelope)
        return hub_pb2.TrainResponse(result_json=trained.to_json())

    @guarded
    def ListNodes(  # noqa: N802 - gRPC method name
        self, request: hub_pb2.ListNodesRequest, context: grpc.ServicerContext
    ) -> hub_pb2.ListNodesResponse:
        """Describe every node; unreachable ones are listed with their status."""
        del request  # carries no fields
        if self.require_tls:
            peer_of(context, is_revoked=self._is_revoked)
        replies = fan_out(
            self.registry.handles,
            "Describe",
            node_pb2.DescribeRequest(),
            deadline_s=self.deadline_ms / 1000,
        )
        response = hub_pb2.ListNodesResponse()
        for r in replies:
            if r.status is NodeStatus.OK and isinstance(r.value, node_pb2.DescribeResponse):
                response.nodes.append(r.value)
            else:
                response.unavailable.append(
                    serde.outcome_to_proto(
                        NodeOutcome(node=r.node, status=r.status, message=r.message)
                    )
                )
        # Auditors read ledgers from each node directly, never through the hub.
        for handle in self.registry.handles:
            response.addresses[handle.entry.name] = handle.entry.address
        return response


def _check_signed_for(envelope: node_pb2.QueryEnvelope, call: Call) -> None:
    """Refuse early, with the nodes' own words, an envelope every node would refuse.

    Only a refusal is decided here, never an acceptance: the hub does not verify the
    signature (each node does), so these fields are the analyst's claim, which is enough to
    tell an analyst that sent the wrong envelope. Whether the hub named is this one, and the
    node audience, are for each node to check against the certificate of whoever relays it.
    """
    signed = serde.signed_query_from_proto(envelope)
    check_payload_version(signed)
    check_operation(signed, call)
    if not signed.audience.hub:
        raise AuthenticationError(
            "the analyst signed this envelope for calling nodes directly, so no hub may relay "
            "it; sign it for this hub (its certificate name)"
        )


def _combine(
    query: spec.Query,
    replies: list[Reply[object]],
    rules: ReleaseRules,
    *,
    analyst: str = "",
    quorum: int = 0,
) -> FederatedResult:
    """Combine the releases for the analyst; each node's latency is logged, never returned.

    With a quorum, fewer answering nodes fail the query (QuorumNotMetError) instead of
    giving a partial result; what the answering nodes charged is said, and kept by them.

    A node's latency is mostly its exact DuckDB run time, which depends on its data and has no
    noise on it, so analysts get 0 and only the hub's operator sees the real figure.
    """
    releases: list[tuple[str, NodeRelease]] = []
    outcomes: list[NodeOutcome] = []
    for r in replies:
        if r.status is NodeStatus.OK and isinstance(r.value, node_pb2.ExecuteResponse):
            release = serde.release_from_proto(r.value)
            releases.append((r.node, release))
            # No latency_ms in any outcome: it stays 0 (see above).
            outcomes.append(
                NodeOutcome(
                    node=r.node,
                    status=NodeStatus.OK,
                    rho_charged=release.rho_charged,
                    noise_variance=release.noise.variance,
                    budget=release.budget,
                    measures=release.measures,
                    node_query_id=release.query_id,
                    ledger_sequence=release.ledger_sequence,
                    resent=r.value.resent,
                )
            )
        else:
            outcomes.append(NodeOutcome(node=r.node, status=r.status, message=r.message))
    query_id = uuid.uuid4().hex
    log.info(
        "query %s from %s: %s",
        query_id,
        analyst,
        ", ".join(f"{r.node}={r.status.value} in {r.latency_ms:.0f} ms" for r in replies),
    )
    if not releases and (refusal := unanimous_refusal(replies)) is not None:
        code, messages = refusal
        raise AllNodesRefusedError(code, "every node refused the query: " + messages)
    if len(releases) < quorum:
        raise QuorumNotMetError(_quorum_message(replies, outcomes, quorum))
    partial = len(releases) < len(replies)
    effective = rules
    for _, release in releases:
        if release.rules is not None:
            effective = effective.strictest(release.rules)
    with combine_timer():
        table = release_rules.apply(
            combine.combine(query, releases, partial=partial), effective, query.group_by
        )
    return FederatedResult(
        query_id=query_id,
        table=table,
        nodes=tuple(outcomes),
        partial=partial,
    )


def _quorum_message(
    replies: Sequence[Reply[object]], outcomes: Sequence[NodeOutcome], quorum: int
) -> str:
    """Why a query failed its quorum, and what the nodes that answered charged."""
    answered = [o for o in outcomes if o.status is NodeStatus.OK]
    missing = "; ".join(
        f"{r.node} {r.status.value}: {r.message}" for r in replies if r.status is not NodeStatus.OK
    )
    text = (
        f"{QuorumNotMetError.PREFIX}only {len(answered)} of {len(replies)} nodes answered, "
        f"fewer than the quorum of {quorum}, so no result was combined ({missing})."
    )
    if answered:
        charged = ", ".join(f"{o.node} rho {o.rho_charged:.4g}" for o in answered)
        text += (
            f" The nodes that answered charged their budgets ({charged}) and keep their "
            "releases: re-send the same signed envelope before it expires to read them again "
            "at no further cost (the Python client and `chc query` re-send it while the hub is "
            "unavailable), or lower the quorum."
        )
    return text
