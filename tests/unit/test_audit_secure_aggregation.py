"""The auditor and secure-aggregation ledger entries (docs/ledger.md, "Secure aggregation").

Every ledger here is written by the real node accountant from envelopes a test PKI's analyst
signed, with shares sized by the real calibration (queries/distributed_noise.py); a test then
edits one thing the node could get wrong and checks that `chc audit verify` names the entry.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from coordinator.audit.secure_checks import kls_all_honest_floor
from coordinator.audit.verification import Verification, verify
from node.budget.accounting import Charge, MemoryAccountant
from protocols import serde
from protocols.budget.policy import BudgetPolicy
from protocols.ledger.entry import decode_body, read_secure_aggregation
from protocols.security.envelope import Audience, sign_query
from queries.distributed_noise import calibrate_distributed
from queries.mechanisms import rho_to_epsilon
from queries.results import SecureAggregation, ShareNoise
from queries.spec import Measure, Query, Statistic, canonical_bytes
from tests.unit._accounting_helpers import Pki, make_pki, source_of

ROUND = ("nwc", "sgh", "tth", "wel")
ME = "nwc"
HONEST = 3
# Two components of one query (a count and a sum), each with its share of the query's rho.
PARTS = (("count", 1.0, 0.15, 1), ("sum:age", 120.0, 0.25, 6))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _record(nodes: int = len(ROUND), threshold: int = HONEST) -> SecureAggregation:
    """What a node of the round records, from the real calibration of each component."""
    shares = []
    for name, sensitivity, rho, length in PARTS:
        cal = calibrate_distributed(sensitivity, rho, nodes, threshold, dimension=length)
        shares.append(
            ShareNoise(
                component=name,
                length=cal.dimension,
                upscale=cal.upscale,
                share_scale=cal.share_scale,
                unit=1.0,
                rho=cal.target_rho,
                rho_threshold=cal.rho_threshold,
                rho_all_honest=cal.rho_all_honest,
            )
        )
    return SecureAggregation(
        nodes=nodes,
        threshold=threshold,
        rho_threshold=sum(s.rho_threshold for s in shares),
        rho_all_honest=sum(s.rho_all_honest for s in shares),
        components=tuple(shares),
        round=ROUND,
    )


def _query(**changes: Any) -> Query:
    fields: dict[str, Any] = {
        "view": "persons",
        "rho": sum(p[2] for p in PARTS),
        "measures": (Measure(), Measure(Statistic.SUM, name="age", column="age")),
        "pooled_only": True,
        "honest_nodes": HONEST,
    }
    return Query(**(fields | changes))


def _charge(
    pki: Pki,
    record: SecureAggregation,
    *,
    query: Query | None = None,
    audience: tuple[str, ...] = ROUND,
    envelope: tuple[bytes, bytes] | None = None,
    rho: float | None = None,
) -> Charge:
    """A masked share's charge as the node builds it, under a real analyst-signed envelope."""
    if envelope is None:
        envelope = _envelope(pki, query or _query(), audience)
    charged = sum(p[2] for p in PARTS) if rho is None else rho
    return Charge(
        query_id="q-secure",
        analyst=pki.alice.name,
        query=envelope[0],
        envelope=envelope[1],
        views=("persons",),
        rho=charged,
        epsilon=rho_to_epsilon(charged, 1e-6),
        secure_aggregation=record,
    )


def _envelope(pki: Pki, query: Query, audience: tuple[str, ...] = ROUND) -> tuple[bytes, bytes]:
    signed = sign_query(
        pki.alice, canonical_bytes(query), audience=Audience(hub="hub", nodes=audience)
    )
    return signed.query, serde.signed_query_to_proto(signed).SerializeToString(deterministic=True)


def _verified(
    pki: Pki, charges: list[Charge], node: str = ME
) -> tuple[MemoryAccountant, Verification]:
    ledger = MemoryAccountant(BudgetPolicy(total_rho=100.0, max_rho_per_query=5.0), node=node)
    for c in charges:
        ledger.charge(c)
    return ledger, verify(source_of(ledger), ca_pem=pki.ca_pem)


def _last(ledger: MemoryAccountant) -> int:
    return max(e.sequence for e in ledger.entries())


def _flags(pki: Pki, charge: Charge, node: str = ME) -> tuple[int, list[str]]:
    """The entry a single charge was written as, and every anomaly named at it."""
    ledger, found = _verified(pki, [charge], node)
    label = _last(ledger)
    assert all(a.entry == label for a in found.anomalies), found.anomalies
    return label, [a.problem for a in found.anomalies]


def _assert_flagged(problems: list[str], wanted: str) -> None:
    assert any(wanted in p for p in problems), problems


def test_a_well_formed_share_verifies_and_is_noted(pki: Pki) -> None:
    ledger, found = _verified(pki, [_charge(pki, _record())])
    assert found.anomalies == []
    label = _last(ledger)
    body = decode_body(next(e.body for e in ledger.entries() if e.sequence == label))
    assert read_secure_aggregation(body) == _record()
    record = _record()
    assert record.rho_all_honest < record.rho_threshold  # t < k: a stronger guarantee
    notes = [n for n in found.notes if n.startswith(f"entry {label}: a secure-aggregation")]
    assert len(notes) == 1, found.notes
    for part in ("(k = 4, t = 3)", "rho 0.4 charged", "if only 3 nodes are honest", "if all 4"):
        assert part in notes[0], notes[0]
    assert found.released == 1


def test_every_node_in_the_round_and_all_honest_verify(pki: Pki) -> None:
    """t = k (honest_nodes absent), written by every node of the round: nothing flagged."""
    record = _record(threshold=len(ROUND))
    envelope = _envelope(pki, _query(honest_nodes=None))
    for node in ROUND:
        _, found = _verified(pki, [_charge(pki, record, envelope=envelope)], node)
        assert found.anomalies == [], (node, found.anomalies)


def test_many_shares_are_noted_once_each_then_counted(pki: Pki) -> None:
    charges = [_charge(pki, _record()) for _ in range(22)]
    ledger, found = _verified(pki, charges)
    assert found.anomalies == []
    shares = [n for n in found.notes if "a secure-aggregation share" in n]
    assert len(shares) == 20
    assert (
        found.notes[-1] == f"and 2 more secure-aggregation shares (the last: entry {_last(ledger)})"
    )


# What a buggy node could write: the accountant serialises whatever record it is given.
_TEXT_NODES = replace(_record(), nodes="4")  # type: ignore[arg-type]
_NUMBERED_ROUND = replace(_record(), round=(1, 2, 3, 4))  # type: ignore[arg-type]
_TEXT_LENGTH = replace(_record().components[0], length="6")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("record", "wanted"),
    [
        (_TEXT_NODES, "needs whole numbers nodes and threshold"),
        (_NUMBERED_ROUND, "needs the round's node names"),
        (
            replace(_record(), components=(_TEXT_LENGTH,)),
            "needs a name and whole numbers length and upscale",
        ),
    ],
)
def test_a_malformed_field_is_flagged(pki: Pki, record: SecureAggregation, wanted: str) -> None:
    _, problems = _flags(pki, _charge(pki, record))
    _assert_flagged(problems, wanted)


def test_a_share_of_a_query_that_is_not_pooled_only_is_flagged(pki: Pki) -> None:
    charge = _charge(pki, _record(), query=_query(pooled_only=False, honest_nodes=None))
    _, problems = _flags(pki, charge)
    _assert_flagged(problems, "of a query that is not pooled_only")


@pytest.mark.parametrize(
    ("honest", "wanted"),
    [
        (2, "records threshold 3, but the analyst's query assumes 2 honest"),
        (None, "records threshold 3, but the analyst's query assumes all k nodes honest"),
    ],
)
def test_a_threshold_other_than_the_query_asked_is_flagged(
    pki: Pki, honest: int | None, wanted: str
) -> None:
    _, problems = _flags(pki, _charge(pki, _record(), query=_query(honest_nodes=honest)))
    _assert_flagged(problems, wanted)


@pytest.mark.parametrize(
    ("changes", "wanted"),
    [
        ({"threshold": 0}, "records threshold 0 of 4 nodes; it must be from 1 to 4"),
        ({"threshold": 5}, "records threshold 5 of 4 nodes"),
        ({"nodes": 5}, "records 5 nodes but its round names 4"),
        ({"round": tuple(reversed(ROUND))}, "its round's node names are not sorted and distinct"),
        ({"round": ("nwc", "nwc", "sgh", "tth")}, "not sorted and distinct"),
    ],
)
def test_a_round_that_does_not_add_up_is_flagged(
    pki: Pki, changes: dict[str, Any], wanted: str
) -> None:
    # The query asks for the recorded threshold where a query can (honest_nodes >= 1).
    threshold = max(1, changes.get("threshold", HONEST))
    charge = _charge(pki, replace(_record(), **changes), query=_query(honest_nodes=threshold))
    _, problems = _flags(pki, charge)
    _assert_flagged(problems, wanted)


def test_a_round_without_this_node_is_flagged(pki: Pki) -> None:
    _, problems = _flags(pki, _charge(pki, _record()), node="york")
    _assert_flagged(problems, "does not include this node, york")


@pytest.mark.parametrize(
    ("audience", "wanted"),
    [
        (
            (*ROUND, "york"),
            "its round is not the nodes the analyst's envelope names: the round lacks york",
        ),
        (ROUND[:3], "the envelope does not name wel"),
        ((), "the analyst's envelope names no nodes"),
    ],
)
def test_a_round_other_than_the_envelopes_audience_is_flagged(
    pki: Pki, audience: tuple[str, ...], wanted: str
) -> None:
    _, problems = _flags(pki, _charge(pki, _record(), audience=audience))
    _assert_flagged(problems, wanted)


def test_a_threshold_guarantee_above_the_charge_is_flagged(pki: Pki) -> None:
    record = _record()
    parts = tuple(replace(c, rho_threshold=c.rho * 1.01) for c in record.components)
    bad = replace(record, components=parts, rho_threshold=sum(c.rho_threshold for c in parts))
    _, problems = _flags(pki, _charge(pki, bad))
    _assert_flagged(problems, "claims rho_threshold 0.404, above the rho 0.4 it charged")
    _assert_flagged(problems, "component 'count' claims rho_threshold 0.1515, above its rho")


def test_an_all_honest_guarantee_above_the_threshold_one_is_flagged(pki: Pki) -> None:
    record = _record()
    parts = tuple(replace(c, rho_all_honest=c.rho_threshold * 1.5) for c in record.components)
    bad = replace(record, components=parts, rho_all_honest=sum(c.rho_all_honest for c in parts))
    _, problems = _flags(pki, _charge(pki, bad))
    _assert_flagged(problems, "claims rho_all_honest")
    _assert_flagged(problems, "above its rho_threshold")
    _assert_flagged(problems, "component 'sum:age' claims rho_all_honest")


def test_components_that_do_not_add_up_to_the_charge_are_flagged(pki: Pki) -> None:
    _, problems = _flags(pki, _charge(pki, _record(), rho=0.45))
    _assert_flagged(problems, "its components' rho add up to 0.4, not the rho it charged 0.45")


@pytest.mark.parametrize("total", ["rho_threshold", "rho_all_honest"])
def test_guarantees_other_than_the_components_sum_are_flagged(pki: Pki, total: str) -> None:
    record = _record()
    bad = replace(record, **{total: getattr(record, total) * 0.9})
    _, problems = _flags(pki, _charge(pki, bad))
    _assert_flagged(problems, f"its components' {total} add up to")


@pytest.mark.parametrize(
    "change", [{"upscale": 0}, {"share_scale": 0.0}, {"share_scale": -1.0}, {"length": 0}]
)
def test_an_impossible_component_is_flagged(pki: Pki, change: dict[str, Any]) -> None:
    record = _record()
    parts = (replace(record.components[0], **change), record.components[1])
    _, problems = _flags(pki, _charge(pki, replace(record, components=parts)))
    _assert_flagged(problems, "component 'count' records length")
    _assert_flagged(problems, "it needs length and upscale at least 1 and a positive share scale")


def test_an_all_honest_guarantee_better_than_kls21_allows_is_flagged(pki: Pki) -> None:
    """Overstating the all-honest protection, consistently in every total, is still caught."""
    record = _record()
    first = replace(record.components[0], rho_all_honest=record.components[0].rho / 8)
    parts = (first, *record.components[1:])
    bad = replace(record, components=parts, rho_all_honest=sum(c.rho_all_honest for c in parts))
    _, problems = _flags(pki, _charge(pki, bad))
    assert len(problems) == 1, problems
    _assert_flagged(problems, "component 'count' claims rho_all_honest 0.01875, below KLS21's")


def test_a_threshold_guarantee_below_kls21s_penalty_is_flagged(pki: Pki) -> None:
    """Four shares of scale 0.6 carry KLS21's penalty (about 0.13 here) whatever the
    sensitivity, so a recorded threshold guarantee of 0.05 is impossible."""
    share = ShareNoise("count", 1, 1, 0.6, 1.0, 0.1, 0.05, 0.05)
    record = SecureAggregation(4, 4, 0.05, 0.05, (share,), ROUND)
    assert kls_all_honest_floor(share, 4, 4) is None
    charge = _charge(pki, record, query=_query(honest_nodes=None), rho=0.1)
    _, problems = _flags(pki, charge)
    assert problems == [
        "component 'count' claims rho_threshold 0.05, less than KLS21's penalty alone for 4 "
        "shares of scale 0.6: no sensitivity gives it"
    ]


def test_the_same_envelope_released_twice_is_flagged(pki: Pki) -> None:
    envelope = _envelope(pki, _query())
    first, second = (_charge(pki, _record(), envelope=envelope) for _ in range(2))
    ledger, found = _verified(pki, [first, second])
    label = _last(ledger)
    assert [(a.entry, a.problem) for a in found.anomalies] == [
        (label, f"replays the envelope already released as entry {label - 1}")
    ]


@pytest.mark.parametrize(("nodes", "threshold"), [(2, 1), (2, 2), (4, 3), (16, 4), (16, 16)])
@pytest.mark.parametrize("upscale", [None, 1])
@pytest.mark.parametrize(("sensitivity", "rho", "dimension"), [(1.0, 0.1, 1), (3.5, 0.01, 40)])
def test_kls21_floor_matches_the_calibration(
    nodes: int, threshold: int, upscale: int | None, sensitivity: float, rho: float, dimension: int
) -> None:
    """The sensitivity inferred from rho_threshold gives back the recorded rho_all_honest."""
    cal = calibrate_distributed(
        sensitivity, rho, nodes, threshold, dimension=dimension, upscale=upscale
    )
    share = ShareNoise(
        "c",
        dimension,
        cal.upscale,
        cal.share_scale,
        1.0,
        rho,
        cal.rho_threshold,
        cal.rho_all_honest,
    )
    floor = kls_all_honest_floor(share, nodes, threshold)
    assert floor is not None
    assert floor <= cal.rho_all_honest * (1 + 1e-12)
    assert floor >= cal.rho_all_honest * (1 - 1e-9)


def test_a_pooled_only_query_released_without_a_share_is_flagged(pki: Pki) -> None:
    """Nodes refuse to Execute pooled_only envelopes: an entry that released the node's own
    figures for one (no secure_aggregation field) is named."""
    charge = replace(_charge(pki, _record()), secure_aggregation=None)
    _, problems = _flags(pki, charge)
    _assert_flagged(problems, "released the node's own figures for a pooled_only query")
