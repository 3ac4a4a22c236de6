"""The only module (with protocols/serde_fit.py, for model fits) that converts between chc's
domain objects and protobuf messages.

Tables travel as Arrow IPC streams. Every *_from_proto validates what a peer sent, so that a
malformed message becomes a clear error rather than a crash deeper in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from datetime import date

import pyarrow as pa

from protocols.secagg.keys import Announcement
from protocols.security.envelope import LEGACY_PAYLOAD_VERSION, Audience, Operation, SignedQuery
from protocols.v1 import hub_pb2, node_pb2
from protocols.version import CURRENT
from queries.cohort import Allow, CohortPolicy
from queries.errors import DataError
from queries.results import (
    BudgetStatus,
    FederatedResult,
    MeasureNoise,
    NodeDescription,
    NodeExplain,
    NodeOutcome,
    NodeRelease,
    NodeStatus,
    NoiseInfo,
    ReleaseRules,
    SecureAggregation,
    ShareNoise,
)
from queries.schema import MAX_PERSONS, Catalog, ColumnSpec, ColumnType, ViewSpec
from queries.spec import Query

# What a node says it speaks in DescribeResponse (protocols/version.py; 1.0 nodes say "chc.v1").
PROTOCOL_VERSION = str(CURRENT)


def table_to_ipc(table: pa.Table) -> bytes:
    """Serialise an Arrow table as an IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def table_from_ipc(data: bytes) -> pa.Table:
    """Read an Arrow IPC stream, refusing anything that is not one."""
    try:
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"peer sent a table that is not an Arrow IPC stream: {exc}") from None


# Operations by their wire number; an unknown number reads as None, which no call accepts.
_OPERATIONS: dict[node_pb2.Operation.ValueType, Operation] = {
    node_pb2.OPERATION_EXECUTE: Operation.EXECUTE,
    node_pb2.OPERATION_EXPLAIN: Operation.EXPLAIN,
    node_pb2.OPERATION_BUDGET: Operation.BUDGET,
    node_pb2.OPERATION_FIT: Operation.FIT,
}
_OPERATION_NUMBERS = {op: number for number, op in _OPERATIONS.items()}


def signed_query_to_proto(signed: SignedQuery) -> node_pb2.QueryEnvelope:
    """Envelope for the wire."""
    msg = node_pb2.QueryEnvelope(
        query=signed.query,
        analyst=signed.analyst,
        nonce=signed.nonce,
        issued_at_ms=signed.issued_at_ms,
        expires_at_ms=signed.expires_at_ms,
        analyst_certificate=signed.analyst_certificate,
        signature_algorithm=signed.signature_algorithm,
        signature=signed.signature,
    )
    # Fields that are not set are left out, so a version-1 envelope (which predates them)
    # serialises to the bytes it always did.
    if signed.payload_version != LEGACY_PAYLOAD_VERSION:
        msg.payload_version = signed.payload_version
    if signed.operation is not None:
        msg.operation = _OPERATION_NUMBERS[signed.operation]
    if signed.audience.hub or signed.audience.nodes:
        msg.audience.hub = signed.audience.hub
        msg.audience.nodes.extend(signed.audience.nodes)
    return msg


def signed_query_from_proto(msg: node_pb2.QueryEnvelope) -> SignedQuery:
    """Envelope from the wire (verified separately by security.envelope.verify_analyst)."""
    return SignedQuery(
        query=msg.query,
        analyst=msg.analyst,
        nonce=msg.nonce,
        issued_at_ms=msg.issued_at_ms,
        expires_at_ms=msg.expires_at_ms,
        analyst_certificate=msg.analyst_certificate,
        signature_algorithm=msg.signature_algorithm,
        signature=msg.signature,
        payload_version=msg.payload_version or LEGACY_PAYLOAD_VERSION,
        operation=_OPERATIONS.get(msg.operation),
        audience=Audience(hub=msg.audience.hub, nodes=tuple(msg.audience.nodes)),
    )


def budget_to_proto(budget: BudgetStatus) -> node_pb2.BudgetStatus:
    """Budget for the wire."""
    return node_pb2.BudgetStatus(
        rho_total=budget.rho_total,
        rho_spent=budget.rho_spent,
        rho_remaining=budget.rho_remaining,
        max_rho_per_query=budget.max_rho_per_query,
        delta=budget.delta,
    )


def budget_from_proto(msg: node_pb2.BudgetStatus) -> BudgetStatus:
    """Budget from the wire."""
    return BudgetStatus(
        rho_total=msg.rho_total,
        rho_spent=msg.rho_spent,
        max_rho_per_query=msg.max_rho_per_query,
        delta=msg.delta,
    )


def _column_to_proto(col: ColumnSpec) -> node_pb2.ColumnInfo:
    return node_pb2.ColumnInfo(
        name=col.name,
        type=col.type.value,
        domain=list(col.domain),
        description=col.description,
        person_level=col.person_level,
        lower=col.lower,
        upper=col.upper,
    )


def _column_from_proto(msg: node_pb2.ColumnInfo) -> ColumnSpec:
    try:
        kind = ColumnType(msg.type)
    except ValueError:
        raise DataError(f"column {msg.name!r} has unknown type {msg.type!r}") from None
    try:
        return ColumnSpec(
            name=msg.name,
            type=kind,
            description=msg.description,
            domain=tuple(msg.domain),
            person_level=msg.person_level,
            lower=msg.lower if msg.HasField("lower") else None,
            upper=msg.upper if msg.HasField("upper") else None,
        )
    except ValueError as exc:
        raise DataError(f"peer described an invalid column: {exc}") from None


def description_to_proto(desc: NodeDescription) -> node_pb2.DescribeResponse:
    """A node's public description for the wire."""
    return node_pb2.DescribeResponse(
        node=desc.node,
        protocol_version=desc.protocol_version,
        views=[
            node_pb2.ViewInfo(
                name=v.name,
                description=v.description,
                columns=[_column_to_proto(c) for c in v.columns],
                max_rows_per_person=v.max_rows_per_person,
                max_persons=v.max_persons,
                rank_column=v.rank_column or "",
            )
            for v in desc.catalog.views
        ],
        budget=budget_to_proto(desc.budget),
        reference_date=(
            desc.catalog.reference_date.isoformat() if desc.catalog.reference_date else ""
        ),
        cohorts=node_pb2.CohortAccess(
            allow=desc.cohorts.allow.value, concepts=list(desc.cohorts.concepts)
        ),
    )


def description_from_proto(msg: node_pb2.DescribeResponse) -> NodeDescription:
    """A node's public description from the wire."""
    views = tuple(
        ViewSpec(
            name=v.name,
            description=v.description,
            columns=tuple(_column_from_proto(c) for c in v.columns),
            max_rows_per_person=v.max_rows_per_person,
            max_persons=v.max_persons or MAX_PERSONS,
            rank_column=v.rank_column or None,
        )
        for v in msg.views
    )
    return NodeDescription(
        node=msg.node,
        protocol_version=msg.protocol_version,
        catalog=Catalog(views=views, reference_date=_date_or_none(msg.reference_date)),
        budget=budget_from_proto(msg.budget),
        cohorts=_cohorts_from_proto(msg.cohorts),
    )


def _cohorts_from_proto(msg: node_pb2.CohortAccess) -> CohortPolicy:
    # A node that says nothing (an older one) answers no ad hoc cohorts.
    try:
        allow = Allow(msg.allow or Allow.NONE.value)
        return CohortPolicy(allow, tuple(int(c) for c in msg.concepts))
    except ValueError as exc:
        raise DataError(f"peer described an invalid ad hoc cohort policy: {exc}") from None


def _date_or_none(text: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise DataError(f"peer described an invalid reference date {text[:40]!r}") from None


def noise_to_proto(noise: NoiseInfo) -> node_pb2.NoiseInfo:
    """Noise description for the wire."""
    return node_pb2.NoiseInfo(
        mechanism=noise.mechanism,
        scale=noise.scale,
        variance=noise.variance,
        sensitivity=noise.sensitivity,
    )


def noise_from_proto(msg: node_pb2.NoiseInfo) -> NoiseInfo:
    """Noise description from the wire; a negative or non-finite noise is refused."""
    for field in ("scale", "variance", "sensitivity"):
        value = getattr(msg, field)
        if not math.isfinite(value) or value < 0:
            # An impossible noise would turn into an interval that claims no error.
            raise DataError(f"peer reported an impossible noise {field}: {value!r}")
    return NoiseInfo(
        mechanism=msg.mechanism,
        scale=msg.scale,
        variance=msg.variance,
        sensitivity=msg.sensitivity,
    )


def measure_noise_to_proto(m: MeasureNoise) -> node_pb2.MeasureNoise:
    """One measure's noise and cost for the wire."""
    return node_pb2.MeasureNoise(
        measure=m.measure, statistic=m.statistic, noise=noise_to_proto(m.noise), rho=m.rho
    )


def measure_noise_from_proto(msg: node_pb2.MeasureNoise) -> MeasureNoise:
    """One measure's noise and cost from the wire."""
    return MeasureNoise(
        measure=msg.measure,
        statistic=msg.statistic,
        noise=noise_from_proto(msg.noise),
        rho=msg.rho,
    )


def rules_to_proto(rules: ReleaseRules | None) -> node_pb2.ReleaseRules | None:
    """A node's disclosure rules for the wire (None: none sent)."""
    if rules is None:
        return None
    return node_pb2.ReleaseRules(suppress_below=rules.suppress_below, round_to=rules.round_to)


def rules_from_proto(msg: node_pb2.ReleaseRules) -> ReleaseRules:
    """A node's disclosure rules from the wire (a round_to below 1 is 1: no rounding)."""
    return ReleaseRules(suppress_below=msg.suppress_below, round_to=max(1, msg.round_to))


def release_to_proto(release: NodeRelease) -> node_pb2.ExecuteResponse:
    """A node's DP release for the wire."""
    return node_pb2.ExecuteResponse(
        query_id=release.query_id,
        table=table_to_ipc(release.table),
        noise=noise_to_proto(release.noise),
        rho_charged=release.rho_charged,
        epsilon=release.epsilon,
        budget=budget_to_proto(release.budget),
        measures=[measure_noise_to_proto(m) for m in release.measures],
        release_rules=rules_to_proto(release.rules),
    )


def release_from_proto(msg: node_pb2.ExecuteResponse) -> NodeRelease:
    """A node's DP release from the wire."""
    return NodeRelease(
        query_id=msg.query_id,
        table=table_from_ipc(msg.table),
        noise=noise_from_proto(msg.noise),
        rho_charged=msg.rho_charged,
        epsilon=msg.epsilon,
        budget=budget_from_proto(msg.budget),
        measures=tuple(measure_noise_from_proto(m) for m in msg.measures),
        rules=rules_from_proto(msg.release_rules) if msg.HasField("release_rules") else None,
        ledger_sequence=msg.ledger_sequence,
    )


def outcome_to_proto(outcome: NodeOutcome) -> hub_pb2.NodeOutcome:
    """One node's outcome for the wire."""
    msg = hub_pb2.NodeOutcome(
        node=outcome.node,
        status=outcome.status.value,
        message=outcome.message,
        rho_charged=outcome.rho_charged,
        noise_variance=outcome.noise_variance,
        latency_ms=outcome.latency_ms,
        measures=[measure_noise_to_proto(m) for m in outcome.measures],
        node_query_id=outcome.node_query_id,
        ledger_sequence=outcome.ledger_sequence,
        resent=outcome.resent,
        charge_unknown=outcome.charge_unknown,
    )
    if outcome.budget is not None:
        msg.budget.CopyFrom(budget_to_proto(outcome.budget))
    return msg


def outcome_from_proto(msg: hub_pb2.NodeOutcome) -> NodeOutcome:
    """One node's outcome from the wire."""
    try:
        status = NodeStatus(msg.status)
    except ValueError:
        raise DataError(f"node {msg.node!r} has unknown status {msg.status!r}") from None
    return NodeOutcome(
        node=msg.node,
        status=status,
        message=msg.message,
        rho_charged=msg.rho_charged,
        noise_variance=msg.noise_variance,
        budget=budget_from_proto(msg.budget) if msg.HasField("budget") else None,
        latency_ms=msg.latency_ms,
        measures=tuple(measure_noise_from_proto(m) for m in msg.measures),
        node_query_id=msg.node_query_id,
        ledger_sequence=msg.ledger_sequence,
        resent=msg.resent,
        charge_unknown=msg.charge_unknown,
    )


def announcement_to_proto(a: Announcement) -> node_pb2.SecAggAnnouncement:
    """A node's signed round key for the wire."""
    return node_pb2.SecAggAnnouncement(
        node=a.name,
        public_key=a.public_key,
        query_digest=a.query_digest,
        certificate=a.certificate,
        signature=a.signature,
        signature_algorithm=a.signature_algorithm,
    )


def announcement_from_proto(msg: node_pb2.SecAggAnnouncement) -> Announcement:
    """A node's signed round key from the wire (verify it with verify_announcement)."""
    return Announcement(
        name=msg.node,
        public_key=msg.public_key,
        query_digest=msg.query_digest,
        certificate=msg.certificate,
        signature=msg.signature,
        signature_algorithm=msg.signature_algorithm,
    )


def guarantee_to_proto(g: SecureAggregation) -> node_pb2.SecAggGuarantee:
    """A secure aggregate's noise shares and guarantee for the wire."""
    return node_pb2.SecAggGuarantee(
        nodes=g.nodes,
        threshold=g.threshold,
        rho_threshold=g.rho_threshold,
        rho_all_honest=g.rho_all_honest,
        components=[
            node_pb2.SecAggComponent(
                component=c.component,
                length=c.length,
                upscale=c.upscale,
                share_scale=c.share_scale,
                unit=c.unit,
                rho=c.rho,
                rho_threshold=c.rho_threshold,
                rho_all_honest=c.rho_all_honest,
            )
            for c in g.components
        ],
        round=list(g.round),
    )


def guarantee_from_proto(msg: node_pb2.SecAggGuarantee) -> SecureAggregation:
    """A secure aggregate's noise shares and guarantee from the wire."""
    return SecureAggregation(
        nodes=msg.nodes,
        threshold=msg.threshold,
        rho_threshold=msg.rho_threshold,
        rho_all_honest=msg.rho_all_honest,
        components=tuple(
            ShareNoise(
                component=c.component,
                length=c.length,
                upscale=c.upscale,
                share_scale=c.share_scale,
                unit=c.unit,
                rho=c.rho,
                rho_threshold=c.rho_threshold,
                rho_all_honest=c.rho_all_honest,
            )
            for c in msg.components
        ),
        round=tuple(msg.round),
    )


def result_to_proto(result: FederatedResult) -> hub_pb2.SubmitResponse:
    """The hub's combined result for the wire."""
    msg = hub_pb2.SubmitResponse(
        query_id=result.query_id,
        table=table_to_ipc(result.table),
        nodes=[outcome_to_proto(o) for o in result.nodes],
        partial=result.partial,
    )
    if result.secure_aggregation is not None:
        msg.secure_aggregation.CopyFrom(guarantee_to_proto(result.secure_aggregation))
    return msg


def result_from_proto(msg: hub_pb2.SubmitResponse) -> FederatedResult:
    """The hub's combined result from the wire."""
    return FederatedResult(
        query_id=msg.query_id,
        table=table_from_ipc(msg.table),
        nodes=tuple(outcome_from_proto(o) for o in msg.nodes),
        partial=msg.partial,
        secure_aggregation=(
            guarantee_from_proto(msg.secure_aggregation)
            if msg.HasField("secure_aggregation")
            else None
        ),
    )


def explain_to_proto(e: NodeExplain) -> hub_pb2.ExplainResult:
    """One node's explanation for the wire."""
    msg = hub_pb2.ExplainResult(node=e.node, status=e.status.value, message=e.message)
    if e.status is NodeStatus.OK:
        msg.explain.CopyFrom(
            node_pb2.ExplainResponse(
                plan=e.plan,
                measures=[measure_noise_to_proto(m) for m in e.measures],
                rho=e.rho,
                epsilon=e.epsilon,
                cells=e.cells,
                budget=budget_to_proto(e.budget) if e.budget else None,
                secure_measures=[measure_noise_to_proto(m) for m in e.secure_measures],
                secure_aggregation=(
                    guarantee_to_proto(e.secure_aggregation) if e.secure_aggregation else None
                ),
            )
        )
    return msg


def explain_from_proto(msg: hub_pb2.ExplainResult) -> NodeExplain:
    """One node's explanation from the wire."""
    try:
        status = NodeStatus(msg.status)
    except ValueError:
        raise DataError(f"node {msg.node!r} has unknown status {msg.status!r}") from None
    e = msg.explain
    return NodeExplain(
        node=msg.node,
        status=status,
        message=msg.message,
        plan=e.plan,
        measures=tuple(measure_noise_from_proto(m) for m in e.measures),
        rho=e.rho,
        epsilon=e.epsilon,
        cells=e.cells,
        budget=budget_from_proto(e.budget) if e.HasField("budget") else None,
        secure_measures=tuple(measure_noise_from_proto(m) for m in e.secure_measures),
        secure_aggregation=(
            guarantee_from_proto(e.secure_aggregation) if e.HasField("secure_aggregation") else None
        ),
    )


def _query_columns(query: Query) -> list[str]:
    """Every column a query names: its groups, filters and measured columns, sorted."""
    named = {*query.group_by, *(f.column for f in query.where)}
    for m in query.measures:
        named.update(c for c in (m.column, m.denominator) if c is not None)
    return sorted(named)


def pooling_structure(view: ViewSpec, query: Query) -> dict[str, bytes]:
    """What of each column the query names must be the same at every node to pool figures.

    A column's type, public domain (in order) and bounds decide the groups, grids and clamp
    bounds each node releases (queries/combine.py pools them by position); its description
    and person_level may differ. A column the view lacks maps to b"" (the node refuses the
    query itself, naming it).
    """
    columns = {c.name: c for c in view.columns}
    out: dict[str, bytes] = {}
    for name in _query_columns(query):
        col = columns.get(name)
        out[name] = (
            b""
            if col is None
            else node_pb2.ColumnInfo(
                name=col.name,
                type=col.type.value,
                domain=list(col.domain),
                lower=col.lower,
                upper=col.upper,
            ).SerializeToString(deterministic=True)
        )
    return out


def structure_fingerprint(structure: Mapping[str, bytes]) -> bytes:
    """SHA-256 over a pooling_structure (ExecuteRequest.structure), names and all."""
    digest = hashlib.sha256()
    for name in sorted(structure):
        for part in (name.encode(), structure[name]):
            digest.update(len(part).to_bytes(4, "big") + part)
    return digest.digest()
