"""The auditor's checks of a secure-aggregation share's ledger entry (docs/ledger.md).

A node that sends its masked share of a secure aggregate records, in the entry's
`secure_aggregation` field, the round's nodes, the threshold and what its noise share
guarantees. These checks hold that record against the analyst's envelope (pooled_only, its
audience, honest_nodes) and against itself (totals, ranges), and recompute the all-honest
guarantee from KLS21's bound (queries/distributed_noise.py).
"""

from __future__ import annotations

import math

from coordinator.audit.budget import close
from protocols.v1 import node_pb2
from queries import distributed_noise, spec_io
from queries.errors import QueryError
from queries.numbers import show, show_apart
from queries.results import SecureAggregation, ShareNoise

# A guarantee may exceed what it is bounded by only by float rounding (the node sums the
# components in its own order).
_RHO_SLACK = 1e-9
# How far below KLS21's bound a recorded all-honest guarantee may be before it is flagged:
# the sensitivity is inferred from the threshold guarantee by bisection, far finer than this.
_KLS_SLACK = 1e-6


def _above(value: float, bound: float) -> bool:
    """Whether value exceeds bound by more than float rounding."""
    return value > bound * (1 + _RHO_SLACK) + 1e-15


def _listed(names: list[str], shown: int = 8) -> str:
    """Node names for a message, a long list cut short."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def kls_all_honest_floor(share: ShareNoise, nodes: int, threshold: int) -> float | None:
    """The least rho_all_honest KLS21 allows for a component, given its rho_threshold.

    The entry does not record the component's sensitivity, but the threshold guarantee is
    KLS21's bound for t shares of the recorded scale, which increases with the sensitivity:
    the sensitivity is recovered from it by bisection (rounded down, so the floor is never
    overstated), and the all-honest guarantee is the better of t's and k's bound at it
    (queries/distributed_noise.py). None if no sensitivity gives that rho_threshold (it is
    below KLS21's penalty alone), or the record is too malformed to say.
    """
    sigma, d, rho_t = share.share_scale, share.length, share.rho_threshold
    if not (sigma > 0 and d >= 1 and 1 <= threshold <= nodes and 0 < rho_t < math.inf):
        return None

    def at(shares: int, sensitivity: float) -> float:
        return distributed_noise.sum_rho(sigma, sensitivity, shares, d)

    if at(threshold, 0.0) > rho_t * (1 + _KLS_SLACK):
        return None
    low, high = 0.0, sigma * math.sqrt(2.0 * threshold * rho_t)  # s^2/2 alone reaches rho_t
    while high - low > 1e-13 * high:
        middle = (low + high) / 2
        if at(threshold, middle) <= rho_t:
            low = middle
        else:
            high = middle
    return min(at(threshold, low), at(nodes, low))


def secure_aggregation_problems(
    record: SecureAggregation,
    envelope: node_pb2.QueryEnvelope,
    node: str | None,
    rho: float,
) -> list[str]:
    """What is wrong with a release's secure-aggregation record (docs/ledger.md), if anything.

    node is the ledger's node, when known; rho what the entry charged.
    """
    problems: list[str] = []
    k, t, names = record.nodes, record.threshold, list(record.round)
    try:
        query = spec_io.from_json(envelope.query)
    except QueryError as exc:
        problems.append(
            f"records a secure-aggregation share, but its envelope holds no query: {exc}"
        )
    else:
        if not query.pooled_only:
            problems.append(
                "records a secure-aggregation share of a query that is not pooled_only: the "
                "analyst did not give up per-region answers, so no node may share its noise"
            )
        elif t != (k if query.honest_nodes is None else query.honest_nodes):
            asked = "all k nodes" if query.honest_nodes is None else str(query.honest_nodes)
            problems.append(
                f"records threshold {t}, but the analyst's query assumes {asked} honest "
                f"(honest_nodes), so its shares were sized for the wrong threshold"
            )
    if not 1 <= t <= k:
        problems.append(f"records threshold {t} of {k} nodes; it must be from 1 to {k}")
    if k != len(names):
        problems.append(f"records {k} nodes but its round names {len(names)}")
    if names != sorted(set(names)):
        problems.append("its round's node names are not sorted and distinct")
    if node and node not in names:
        problems.append(f"its round ({_listed(names)}) does not include this node, {node}")
    addressed = set(envelope.audience.nodes)
    if not addressed:
        problems.append(
            "the analyst's envelope names no nodes, so nothing shows which nodes the round "
            "was for (a pooled_only envelope must name every node of its round)"
        )
    elif set(names) != addressed:
        missing, extra = sorted(addressed - set(names)), sorted(set(names) - addressed)
        problems.append(
            "its round is not the nodes the analyst's envelope names: "
            + "; ".join(
                ([f"the round lacks {_listed(missing)}"] if missing else [])
                + ([f"the envelope does not name {_listed(extra)}"] if extra else [])
            )
        )
    at_t, at_k = record.rho_threshold, record.rho_all_honest
    if not (at_t > 0 and at_k > 0):
        problems.append(
            f"records guarantees rho {show(at_t)} and {show(at_k)}; both must be positive"
        )
    if _above(at_t, rho):
        shown_t, charged = show_apart(at_t, rho)
        problems.append(
            f"claims rho_threshold {shown_t}, above the rho {charged} it charged: the node "
            "charged less than the release costs if only the threshold's nodes are honest"
        )
    if _above(at_k, at_t):
        shown_k, shown_t = show_apart(at_k, at_t)
        problems.append(
            f"claims rho_all_honest {shown_k}, above its rho_threshold {shown_t} (more honest "
            "nodes can only protect more)"
        )
    problems += _component_problems(record, rho)
    return problems


def _component_problems(record: SecureAggregation, rho: float) -> list[str]:
    """Each component's record, and the components' totals against the entry's."""
    problems: list[str] = []
    parts = record.components
    names = [c.component for c in parts]
    if len(set(names)) != len(names):
        problems.append("its secure_aggregation field lists a component twice")
    for label, total, recorded in (
        ("rho", math.fsum(c.rho for c in parts), rho),
        ("rho_threshold", math.fsum(c.rho_threshold for c in parts), record.rho_threshold),
        ("rho_all_honest", math.fsum(c.rho_all_honest for c in parts), record.rho_all_honest),
    ):
        if not close(total, recorded):
            summed, whole = show_apart(total, recorded)
            what = "the rho it charged" if label == "rho" else f"its {label}"
            problems.append(f"its components' {label} add up to {summed}, not {what} {whole}")
    for c in parts:
        name = repr(c.component)
        if c.length < 1 or c.upscale < 1 or not c.share_scale > 0:
            problems.append(
                f"component {name} records length {c.length}, upscale {c.upscale} and share "
                f"scale {show(c.share_scale)}; it needs length and upscale at least 1 and a "
                "positive share scale"
            )
            continue
        if _above(c.rho_threshold, c.rho):
            shown_t, charged = show_apart(c.rho_threshold, c.rho)
            problems.append(
                f"component {name} claims rho_threshold {shown_t}, above its rho {charged}"
            )
        if _above(c.rho_all_honest, c.rho_threshold):
            shown_k, shown_t = show_apart(c.rho_all_honest, c.rho_threshold)
            problems.append(
                f"component {name} claims rho_all_honest {shown_k}, above its rho_threshold "
                f"{shown_t}"
            )
        floor = kls_all_honest_floor(c, record.nodes, record.threshold)
        if 1 <= record.threshold <= record.nodes and c.rho_threshold > 0 and floor is None:
            problems.append(
                f"component {name} claims rho_threshold {show(c.rho_threshold)}, less than "
                f"KLS21's penalty alone for {record.threshold} shares of scale "
                f"{show(c.share_scale)}: no sensitivity gives it"
            )
        elif floor is not None and c.rho_all_honest < floor * (1 - _KLS_SLACK):
            shown_k, least = show_apart(c.rho_all_honest, floor)
            problems.append(
                f"component {name} claims rho_all_honest {shown_k}, below KLS21's {least} for "
                f"all {record.nodes} shares at the sensitivity its rho_threshold implies"
            )
    return problems
