"""The hub's gRPC servicer: relays analysts' signed queries to every node and combines them."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import grpc
from cryptography import x509

from coordinator.hub.fanout import Reply, fan_out, unanimous_refusal
from coordinator.hub.registry import NodeHandle, Registry
from coordinator.hub.secure_round import audience_handles, run_round
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
from protocols.version import (
    KEPT_ONLY,
    ProtocolMismatchError,
    ProtocolVersion,
    check_compatible,
)
from queries import combine, spec, spec_io
from queries import release as release_rules
from queries.errors import (
    AuthenticationError,
    ChcError,
    ConfigError,
    DataError,
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
# After the deadline, how long a node that timed out is given to re-send the release it kept
# (if it charged just before the deadline and its reply came late). The client waits 5 s
# past its deadline, so this fits with the describe and combine margins.
KEPT_GRACE_S = 1.0
MIN_KEPT_GRACE_S = 0.05  # below this a re-send could not come back: the charge is unknown
# The longest the pooling check waits for a node's Describe (its catalog, for the structure
# the query reads), and at most this share of the deadline; the wait comes out of the
# deadline. A node that does not answer in time checks the structure itself instead.
DESCRIBE_WAIT_S = 1.0
DESCRIBE_SHARE = 0.25
# Domain values quoted per node when their structures differ.
_QUOTED_VALUES = 6


class AllNodesRefusedError(ChcError):
    """Every node refused the query for the same kind of reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status_name = code.name


class PoolingMismatchError(ConfigError):
    """The nodes describe the columns a query reads differently: refused before any charge."""


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
        self.party = "the hub"  # how version refusals name this side (protocols/rpc)
        # Each node's protocol version as it last described itself (protocols/version.py).
        self._versions: dict[str, ProtocolVersion] = {}
        self._versions_lock = threading.Lock()
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
        handles = self.registry.handles
        analyst = request.envelope.analyst
        if request.kept_only and query.pooled_only:
            raise QueryError(
                "a secure aggregate (pooled_only) is not kept for re-sending: each node masks "
                "its share once; run the query again (a new envelope)"
            )
        if request.kept_only:
            # Federation.resend: each node re-sends what it kept for this envelope or says it
            # kept nothing; nothing is run or charged anywhere.
            fetch = node_pb2.ExecuteRequest(envelope=request.envelope, kept_only=True)
            self._describe_unknown_versions(handles, min(DESCRIBE_WAIT_S, deadline_s / 4))
            capable = [self._kept_only_capable(h.entry.name) for h in handles]
            able = [h for h, ok in zip(handles, capable, strict=True) if ok]
            asked = iter(fan_out(able, "Execute", fetch, deadline_s=deadline_s) if able else ())
            replies = [
                _silent(next(asked), deadline_s, query.rho) if ok else _no_fetch_only(h.entry.name)
                for h, ok in zip(handles, capable, strict=True)
            ]
            result = _combine(
                query, replies, self.rules, analyst=analyst, quorum=quorum, refuse_all=False
            )
            return serde.result_to_proto(result)
        if query.pooled_only:
            return self._secure(query, request, deadline_s, context)
        structure, left_s = self._pooling_check_within(query, deadline_s)
        node_request = node_pb2.ExecuteRequest(envelope=request.envelope, structure=structure)
        replies = fan_out(handles, "Execute", node_request, deadline_s=left_s)
        if any(r.code is grpc.StatusCode.FAILED_PRECONDITION for r in replies):
            # Perhaps a node's catalog changed since it was described: describe them again.
            self.registry.forget_catalogs()
        replies = self._late_answers(replies, request.envelope, deadline_s, query.rho, context)
        replies = [_lost_mid_call(r, query.rho) for r in replies]
        result = _combine(query, replies, self.rules, analyst=analyst, quorum=quorum)
        return serde.result_to_proto(result)

    def _secure(
        self,
        query: spec.Query,
        request: hub_pb2.SubmitRequest,
        deadline_s: float,
        context: grpc.ServicerContext,
    ) -> hub_pb2.SubmitResponse:
        """A pooled_only query by secure aggregation, over the nodes its envelope names."""
        del context  # the deadline already accounts for the caller's
        handles = audience_handles(self.registry.handles, request.envelope.audience.nodes)
        structure, left_s = self._pooling_check_within(query, deadline_s, handles)
        result = run_round(
            query,
            request.envelope,
            handles,
            structure=structure,
            deadline_s=left_s,
            rules=self.rules,
            analyst=request.envelope.analyst,
        )
        return serde.result_to_proto(result)

    def _pooling_check_within(
        self,
        query: spec.Query,
        deadline_s: float,
        handles: Sequence[NodeHandle] | None = None,
    ) -> tuple[bytes, float]:
        """The pooling check within a share of the call's deadline, and what is left of the
        deadline after it (the deadline bounds the whole call; messages still name the
        deadline the analyst gave)."""
        began = time.monotonic()
        structure = self._pooling_check(
            query, min(DESCRIBE_WAIT_S, DESCRIBE_SHARE * deadline_s), handles
        )
        return structure, max(0.001, deadline_s - (time.monotonic() - began))

    def _pooling_check(
        self, query: spec.Query, wait_s: float, handles: Sequence[NodeHandle] | None = None
    ) -> bytes:
        """The fingerprint of the structure the query reads, the same at every node described
        (ExecuteRequest.structure), or refuse the query before any node is asked.

        handles: the nodes whose figures would be pooled (default: every node); a secure
        aggregate pools only the nodes its envelope names.

        Catalogs are described again when the cached ones differ, so a stale cache never
        refuses a query. Nodes that do not answer Describe in time, or lack the view, are
        left to check themselves (each compares the fingerprint with its own catalog).
        """
        if query.cohort is not None:
            return b""  # each node builds the cohort's view itself; see queries/cohort.py
        pooled = self.registry.handles if handles is None else handles
        structures = self._structures(query, pooled, wait_s, fresh=False)
        if len({serde.structure_fingerprint(s) for s in structures.values()}) > 1:
            structures = self._structures(query, pooled, wait_s, fresh=True)
        prints = {serde.structure_fingerprint(s) for s in structures.values()}
        if len(prints) > 1:
            raise PoolingMismatchError(_mismatch_message(query.view, structures))
        return next(iter(prints), b"")

    def _structures(
        self, query: spec.Query, handles: Sequence[NodeHandle], wait_s: float, *, fresh: bool
    ) -> dict[str, dict[str, bytes]]:
        """Per node (cached, or described now), the pooling structure of the query's view."""
        catalogs = {}
        stale: list[NodeHandle] = []
        for h in handles:
            cached = None if fresh else self.registry.catalog(h.entry.name)
            if cached is not None:
                catalogs[h.entry.name] = cached
            elif not self.registry.describe_failed(h.entry.name):
                stale.append(h)
        if stale:
            described = fan_out(
                stale, "Describe", node_pb2.DescribeRequest(), deadline_s=wait_s, probe=True
            )
            for r in described:
                catalog = None
                if r.status is NodeStatus.OK and isinstance(r.value, node_pb2.DescribeResponse):
                    self._note_version(r.node, r.value)
                    # A description that does not parse: the node refuses or fails by itself.
                    with contextlib.suppress(DataError):
                        catalog = serde.description_from_proto(r.value).catalog
                self.registry.remember(r.node, catalog)
                if catalog is not None:
                    catalogs[r.node] = catalog
        structures = {
            node: serde.pooling_structure(view, query)
            for node, catalog in catalogs.items()
            for view in catalog.views
            if view.name == query.view
        }
        # A node that lacks a column the query reads refuses the query itself at planning,
        # at no cost and in its own words (e.g. "has not declared care sites"): it is not a
        # mismatch between the nodes that can answer.
        return {
            node: structure for node, structure in structures.items() if all(structure.values())
        }

    def _note_version(self, node: str, described: node_pb2.DescribeResponse) -> None:
        """Keep the protocol version a node described itself with (unreadable: unknown)."""
        try:
            found = ProtocolVersion.parse(described.protocol_version)
        except ProtocolMismatchError:
            return
        with self._versions_lock:
            self._versions[node] = found

    def _kept_only_capable(self, node: str) -> bool:
        """Whether the node has the fetch-only re-send (1.1 on): a 1.0 node would not know
        ExecuteRequest.kept_only and would run the query instead, so it is never sent one."""
        with self._versions_lock:
            found = self._versions.get(node)
        return found is not None and found.supports(KEPT_ONLY)

    def _describe_unknown_versions(self, handles: Sequence[NodeHandle], wait_s: float) -> None:
        """Describe the nodes whose version is not known yet (a probe: no retries)."""
        with self._versions_lock:
            unknown = [h for h in handles if h.entry.name not in self._versions]
        if not unknown:
            return
        for r in fan_out(
            unknown, "Describe", node_pb2.DescribeRequest(), deadline_s=wait_s, probe=True
        ):
            if r.status is NodeStatus.OK and isinstance(r.value, node_pb2.DescribeResponse):
                self._note_version(r.node, r.value)

    def _late_answers(
        self,
        replies: list[Reply[object]],
        envelope: node_pb2.QueryEnvelope,
        deadline_s: float,
        rho: float,
        context: grpc.ServicerContext | None,
    ) -> list[Reply[object]]:
        """Ask each node that timed out, once, for the release it kept for the envelope.

        A node that charged just before the deadline but whose reply came late has kept its
        release: it then counts as answered (resent, with its receipt). One that kept
        nothing charged nothing; one that still does not answer may have charged (unknown).
        Only nodes of protocol 1.1 or later are asked: a 1.0 node would run the query again.
        """
        timed_out = [i for i, r in enumerate(replies) if r.status is NodeStatus.TIMED_OUT]
        if not timed_out:
            return replies
        late = [i for i in timed_out if self._kept_only_capable(replies[i].node)]
        out = [_silent(r, deadline_s, rho) if i in timed_out else r for i, r in enumerate(replies)]
        if not late:
            return out
        remaining = None if context is None else context.time_remaining()
        grace = KEPT_GRACE_S
        if remaining is not None:
            grace = min(grace, remaining - COMBINE_MARGIN_S)
        fetched: list[Reply[object] | None] = [None] * len(late)
        if grace >= MIN_KEPT_GRACE_S:
            fetch = node_pb2.ExecuteRequest(envelope=envelope, kept_only=True)
            handles = [self.registry.handles[i] for i in late]
            fetched = list(fan_out(handles, "Execute", fetch, deadline_s=grace))
        for i, again in zip(late, fetched, strict=True):
            out[i] = _after_deadline(replies[i], again, deadline_s, rho)
        return out

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
        handles = self.registry.handles
        deadline_s = self._deadline_s(request, context)
        if not is_model(request.envelope.query):
            query = spec_io.from_json(request.envelope.query)
            if query.pooled_only:
                # Secure aggregation runs over the nodes the envelope names, and only them.
                handles = audience_handles(handles, request.envelope.audience.nodes)
            # Explain previews Run: what Run would refuse for its pooling, it refuses too, and
            # each node checks the structure against its own catalog as Execute does.
            node_request.structure, deadline_s = self._pooling_check_within(
                query, deadline_s, handles
            )
        replies = fan_out(handles, "Explain", node_request, deadline_s=deadline_s)
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
            mismatch = None
            if r.status is NodeStatus.OK and isinstance(r.value, node_pb2.DescribeResponse):
                self._note_version(r.node, r.value)
                mismatch = _version_mismatch(r.node, r.value.protocol_version)
            if mismatch is not None:
                response.unavailable.append(
                    serde.outcome_to_proto(
                        NodeOutcome(node=r.node, status=NodeStatus.REFUSED, message=mismatch)
                    )
                )
            elif r.status is NodeStatus.OK and isinstance(r.value, node_pb2.DescribeResponse):
                response.nodes.append(r.value)
            else:
                response.unavailable.append(
                    serde.outcome_to_proto(
                        NodeOutcome(node=r.node, status=r.status, message=r.message)
                    )
                )
        # Auditors read ledgers from each node directly; an outbound-only node's address is
        # "dial", and auditors read it through the hub's relay (docs/outbound.md).
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


def _after_deadline(
    first: Reply[object], again: Reply[object] | None, deadline_s: float, rho: float
) -> Reply[object]:
    """A timed-out node's reply, given what it said to the re-send for its kept release."""
    if again is not None and again.status is NodeStatus.OK:
        return dataclasses.replace(
            again,
            message=(
                f"answered after the deadline of {deadline_s:g} s: the hub read the release it "
                "kept (charged once, when it answered)"
            ),
            latency_ms=first.latency_ms + again.latency_ms,
        )
    if again is not None and again.code is grpc.StatusCode.NOT_FOUND:
        return dataclasses.replace(
            first,
            message=(
                f"node {first.node} did not answer within {deadline_s:g} s and kept no release "
                f"for this envelope: nothing was charged ({again.message})"
            ),
        )
    return _silent(first, deadline_s, rho, asked_again=again is not None)


def _no_fetch_only(node: str) -> Reply[object]:
    """A node too old (or not described) for a fetch-only re-send: nothing was sent to it."""
    return Reply(
        node=node,
        status=NodeStatus.REFUSED,
        value=None,
        message=(
            f"node {node} does not speak chc protocol {KEPT_ONLY} or later (or did not "
            "describe itself), which a re-send of a kept release needs; nothing was sent to "
            "it: `chc budget` shows what it charged"
        ),
        code=grpc.StatusCode.FAILED_PRECONDITION,
        latency_ms=0.0,
    )


def _version_mismatch(node: str, text: str) -> str | None:
    """Why a node of another major version (or an unreadable one) is left out, or None."""
    try:
        check_compatible(ProtocolVersion.parse(text), them=f"node {node}", us="the hub")
    except ProtocolMismatchError as exc:
        return str(exc)
    return None


def _silent(
    reply: Reply[object], deadline_s: float, rho: float, *, asked_again: bool = False
) -> Reply[object]:
    """A reply that timed out with nothing known of the charge marked so; others as they are."""
    if reply.status is not NodeStatus.TIMED_OUT:
        return reply
    again = ", nor to the hub's re-send asking for its kept release" if asked_again else ""
    return _charge_unknown(
        reply, f"node {reply.node} did not answer within {deadline_s:g} s{again}:", rho
    )


def _charge_unknown(reply: Reply[object], lead: str, rho: float) -> Reply[object]:
    """The reply with its charge marked unknown, the message saying why (lead) and how to
    find out (the budget, a re-send of the same envelope)."""
    return dataclasses.replace(
        reply,
        charge_unknown=True,
        message=(
            f"{lead} whether it charged is not known (at most rho {rho:g}); `chc budget` "
            "shows every charge, and re-sending the same envelope later (`chc query --resend "
            "FILE`, Federation.resend) reads its release or says that nothing was charged"
        ),
    )


def _lost_mid_call(reply: Reply[object], rho: float) -> Reply[object]:
    """An unreachable node that may have received the call before its connection was lost
    (and charged): its charge marked unknown, not reported as nothing; others as they are."""
    if not reply.may_have_arrived:  # only ever set on unreachable replies (fanout._failed)
        return reply
    lead = f"{reply.message}; the connection was lost after the call may have reached it, so"
    return _charge_unknown(reply, lead, rho)


def _mismatch_message(view: str, structures: Mapping[str, Mapping[str, bytes]]) -> str:
    """Which nodes differ on which columns of the view, quoted briefly."""
    columns = sorted({c for s in structures.values() for c in s})
    parts = []
    for column in columns:
        by_form: dict[bytes, list[str]] = {}
        for node in sorted(structures):
            by_form.setdefault(structures[node].get(column, b""), []).append(node)
        if len(by_form) < 2:
            continue
        forms = "; ".join(
            f"{', '.join(nodes)}: {_form(raw)}" for raw, nodes in sorted(by_form.items())
        )
        parts.append(f"column {column!r} differs ({forms})")
    return (
        f"pooling: the nodes describe view {view!r} differently, so their figures could not be "
        f"pooled; no node was asked and nothing was charged: {'; '.join(parts)}. Ask the "
        "nodes' operators to align their catalogs (`chc nodes` shows each one's)"
    )


def _form(raw: bytes) -> str:
    """One column's pooling structure in words (a few domain values, the bounds)."""
    if not raw:
        return "no such column"
    col = node_pb2.ColumnInfo.FromString(raw)
    text = col.type
    if col.domain:
        shown = ", ".join(col.domain[:_QUOTED_VALUES])
        more = f", ... ({len(col.domain)} values)" if len(col.domain) > _QUOTED_VALUES else ""
        text += f" [{shown}{more}]"
    if col.HasField("lower") and col.HasField("upper"):
        text += f" from {col.lower:g} to {col.upper:g}"
    return text


def _combine(
    query: spec.Query,
    replies: list[Reply[object]],
    rules: ReleaseRules,
    *,
    analyst: str = "",
    quorum: int = 0,
    refuse_all: bool = True,
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
                    message=r.message,
                )
            )
        else:
            outcomes.append(
                NodeOutcome(
                    node=r.node,
                    status=r.status,
                    message=r.message,
                    charge_unknown=r.charge_unknown,
                )
            )
    query_id = uuid.uuid4().hex
    log.info(
        "query %s from %s: %s",
        query_id,
        analyst,
        ", ".join(f"{r.node}={r.status.value} in {r.latency_ms:.0f} ms" for r in replies),
    )
    # A re-send (refuse_all False) shows each node's answer, even if none kept a release.
    if refuse_all and not releases and (refusal := unanimous_refusal(replies)) is not None:
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
