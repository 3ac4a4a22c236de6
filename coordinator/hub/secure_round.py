"""The hub's part in secure aggregation (docs/secure-aggregation.md): two rounds, one sum.

Round 1 asks every node the envelope names for a signed round key (SecAggAnnounce; nothing
is charged). Round 2 sends each node the envelope with every announcement (SecAggShare);
each node checks the round itself, charges, and answers with its masked vector. The hub adds
the vectors in Z_2^64, where the pairwise masks cancel, and releases the noisy sum only.

The hub's only view of the nodes' values is that sum (protocols.secagg.masks.unmask_sum of
every vector of the round): a round with a vector missing is aborted and nothing is
released, because a partial sum is uniformly random and means nothing. There is no code path
here that looks at a single masked vector's values.

Dropouts (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS, recover them with double masking and secret-shared seeds) are handled by the
documented fallback: abort, report what each node charged, and let the analyst re-run
without the node that dropped (a new envelope, a new round).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from coordinator.hub.fanout import Reply, fan_out, unanimous_refusal
from coordinator.hub.registry import NodeHandle
from protocols import serde
from protocols.secagg import masks
from protocols.v1 import node_pb2
from queries import combine, spec
from queries import release as release_rules
from queries.errors import ChcError, QueryError
from queries.results import (
    FederatedResult,
    NodeOutcome,
    NodeRelease,
    NodeStatus,
    ReleaseRules,
    SecureAggregation,
)

log = logging.getLogger(__name__)

# The name the one combined release goes by inside combine (its rows are dropped: only the
# pooled rows leave the hub).
_SUM = "secure aggregate"


class SecureRoundAbortedError(ChcError):
    """A secure-aggregation round could not finish; nothing was released."""

    status_name = "ABORTED"


def audience_handles(handles: Sequence[NodeHandle], nodes: Sequence[str]) -> list[NodeHandle]:
    """The registry's handles of the nodes the envelope names, or refuse before asking any."""
    by_name = {h.entry.name: h for h in handles}
    unknown = sorted(set(nodes) - set(by_name))
    if unknown:
        raise QueryError(
            f"the envelope names node(s) {unknown} that this hub does not know; nodes here: "
            f"{sorted(by_name)}: sign the query again for this hub's nodes"
        )
    if len(set(nodes)) < 2:
        raise QueryError(
            "a pooled_only query needs at least 2 nodes in its envelope's audience (secure "
            "aggregation of one node would be its own noisy value)"
        )
    return [by_name[n] for n in sorted(set(nodes))]


def run_round(
    query: spec.Query,
    envelope: node_pb2.QueryEnvelope,
    handles: Sequence[NodeHandle],
    *,
    structure: bytes,
    deadline_s: float,
    rules: ReleaseRules,
    analyst: str,
) -> FederatedResult:
    """Both rounds, then the pooled result; raise with every node's outcome if aborted."""
    request = node_pb2.SecAggRequest(envelope=envelope, structure=structure)
    announced = fan_out(handles, "SecAggAnnounce", request, deadline_s=deadline_s / 2)
    failed = [r for r in announced if r.status is not NodeStatus.OK]
    if failed:
        _abort_round_one(announced, failed)
    for r in announced:
        name = r.value.node if isinstance(r.value, node_pb2.SecAggAnnouncement) else None
        if name != r.node:
            raise SecureRoundAbortedError(
                f"node {r.node} announced a round key under the name {name!r}; the round was "
                "aborted before any node charged"
            )
    request.announcements.extend(
        r.value for r in announced if isinstance(r.value, node_pb2.SecAggAnnouncement)
    )
    spent = sum(r.latency_ms for r in announced) / max(1, len(announced)) / 1000
    # Not retried: a node masks at most once, so a second call could only be refused.
    shared = fan_out(
        handles, "SecAggShare", request, deadline_s=max(0.001, deadline_s - spent), retry=False
    )
    outcomes = [_outcome(r) for r in shared]
    missing = [r for r in shared if r.status is not NodeStatus.OK]
    if missing:
        _abort_round_two(shared, missing, outcomes)
    responses = [r.value for r in shared if isinstance(r.value, node_pb2.SecAggShareResponse)]
    guarantee = _agreed_guarantee(shared, responses)
    release = _sum_release(responses, guarantee, rules)
    query_id = uuid.uuid4().hex
    log.info(
        "query %s from %s: secure aggregate over %d nodes (t = %d)",
        query_id,
        analyst,
        guarantee.nodes,
        guarantee.threshold,
    )
    effective = rules
    if release.rules is not None:
        effective = effective.strictest(release.rules)
    table = combine.combine(query, [(_SUM, release)])
    pooled = table.filter(pc.equal(table.column("region"), combine.POOLED))
    return FederatedResult(
        query_id=query_id,
        table=release_rules.apply(pooled, effective, query.group_by),
        nodes=tuple(outcomes),
        partial=False,
        secure_aggregation=guarantee,
    )


def _outcome(r: Reply[object]) -> NodeOutcome:
    if r.status is NodeStatus.OK and isinstance(r.value, node_pb2.SecAggShareResponse):
        v = r.value
        return NodeOutcome(
            node=r.node,
            status=NodeStatus.OK,
            rho_charged=v.rho_charged,
            noise_variance=v.measures[0].noise.variance if v.measures else 0.0,
            budget=serde.budget_from_proto(v.budget),
            measures=tuple(serde.measure_noise_from_proto(m) for m in v.measures),
            node_query_id=v.query_id,
            ledger_sequence=v.ledger_sequence,
        )
    return NodeOutcome(node=r.node, status=r.status, message=r.message)


def _abort_round_one(replies: Sequence[Reply[object]], failed: Sequence[Reply[object]]) -> None:
    """Round 1 failed somewhere: nobody has charged; say why, with the refusing code."""
    said = "; ".join(f"{r.node} {r.status.value}: {r.message}" for r in failed)
    text = (
        f"secure aggregation was aborted in round 1 (round keys), before any node charged: "
        f"{said}. Nothing was charged at any node"
    )
    everyone = unanimous_refusal(replies)
    if everyone is not None:
        error = SecureRoundAbortedError(text + ".")
        error.status_name = everyone[0].name
        raise error
    refused = [r for r in failed if r.status is NodeStatus.REFUSED]
    if refused and refused[0].code is not None:
        # One node's refusal decides (e.g. its budget): the analyst can act on it.
        error = SecureRoundAbortedError(
            text + "; re-run without the refusing node, or fix what it says."
        )
        error.status_name = refused[0].code.name
        raise error
    raise SecureRoundAbortedError(
        text + "; re-run when every node is reachable, or sign the query again without the "
        "missing node (a round must be exactly the nodes the envelope names)."
    )


def _abort_round_two(
    replies: Sequence[Reply[object]],
    missing: Sequence[Reply[object]],
    outcomes: Sequence[NodeOutcome],
) -> None:
    """A vector is missing: the sum is useless; say what each node charged."""
    said = "; ".join(f"{r.node} {r.status.value}: {r.message}" for r in missing)
    charged = [o for o in outcomes if o.status is NodeStatus.OK]
    spent = ", ".join(
        f"{o.node} rho {o.rho_charged:.4g} (ledger #{o.ledger_sequence})" for o in charged
    )
    text = (
        f"secure aggregation was aborted in round 2: {len(missing)} of {len(replies)} nodes did "
        f"not send their masked share ({said}), and without every share the masks do not "
        "cancel, so nothing was released."
    )
    if charged:
        text += (
            f" The nodes that sent theirs charged their budgets as their ledgers record "
            f"({spent}); re-run without the missing node(s) by signing the query again for "
            "the other nodes (a new round, charged again)."
        )
    else:
        text += " No node charged."
    raise SecureRoundAbortedError(text)


def _agreed_guarantee(
    replies: Sequence[Reply[object]], responses: Sequence[node_pb2.SecAggShareResponse]
) -> SecureAggregation:
    """Every node's shares must be sized alike and laid out alike, or the sum is meaningless."""
    first = responses[0]
    for r, v in zip(replies, responses, strict=True):
        same = (
            v.guarantee == first.guarantee
            and v.layout == first.layout
            and len(v.masked) == len(first.masked)
        )
        if not same:
            raise SecureRoundAbortedError(
                f"node {r.node}'s share is sized or laid out differently from "
                f"{replies[0].node}'s, so the sum would mean nothing and nothing was released; "
                "the nodes charged as their ledgers record: compare their catalogs (`chc nodes`)"
            )
    return serde.guarantee_from_proto(first.guarantee)


def _sum_release(
    responses: Sequence[node_pb2.SecAggShareResponse],
    guarantee: SecureAggregation,
    rules: ReleaseRules,
) -> NodeRelease:
    """The sum of every masked vector, decoded and placed in the public layout."""
    vectors = [np.frombuffer(v.masked, dtype="<u8").astype(np.uint64) for v in responses]
    total = np.asarray(masks.unmask_sum(vectors), dtype=np.float64)
    parts, start = [], 0
    for c in guarantee.components:
        # Scaled integers back to natural units: a multiple of unit / upscale.
        parts.append(total[start : start + c.length] / c.upscale * c.unit)
        start += c.length
    layout = serde.table_from_ipc(responses[0].layout)
    values = np.concatenate(parts) if parts else np.zeros(0)
    if values.size != layout.num_rows:
        raise SecureRoundAbortedError(
            f"the masked vectors hold {values.size} values but the layout has "
            f"{layout.num_rows} rows; nothing was released"
        )
    table = layout.append_column(pa.field("value", pa.float64()), pa.array(values))
    first = responses[0]
    measures = tuple(serde.measure_noise_from_proto(m) for m in first.measures)
    strictest = rules
    for v in responses:
        if v.HasField("release_rules"):
            strictest = strictest.strictest(serde.rules_from_proto(v.release_rules))
    return NodeRelease(
        query_id=first.query_id,
        table=table,
        noise=measures[0].noise,
        rho_charged=sum(v.rho_charged for v in responses),
        epsilon=first.epsilon,
        budget=serde.budget_from_proto(first.budget),
        measures=measures,
        rules=strictest,
    )
