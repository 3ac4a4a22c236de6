"""Either a query is refused at no cost before the charge, or its release reaches the caller.

A real node service (mutual TLS on loopback, real DuckDB views over synthetic OMOP data, the
signed in-memory ledger) answers generated specs: sane and absurd numbers (denormal and
huge rho, tiny and huge weights, fractional, inverted and enormous clamps), every statistic,
groupings and filters. For every spec, either the node refuses it with a client error
(never INTERNAL) and its ledger records no spend, or it charges, and the release it sends
is combined and passed through the disclosure rules by the hub's own code without error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from coordinator.local import synth
from node.budget.accounting import MemoryAccountant
from node.data.catalog import build_catalog
from node.data.store import OmopStore
from node.service import NodeService
from protocols import rpc, serde
from protocols.budget.policy import BudgetPolicy
from protocols.security.envelope import sign_query
from protocols.security.pki import Identity, Role, create_ca, issue, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2, node_pb2_grpc
from queries import combine, spec_io
from queries import release as release_rules
from queries.pathway import load_pathways

pytestmark = pytest.mark.integration


@dataclass
class Node:
    """A node service on loopback and an analyst's stub for it."""

    stub: node_pb2_grpc.NodeStub
    analyst: Identity
    accountant: MemoryAccountant
    # A second analyst for the deadline test: the node rate-limits the recording of one
    # peer's refusals, and the property test makes the first analyst refused many times.
    late_stub: node_pb2_grpc.NodeStub
    late: Identity


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("charge")
    synth.generate_region(synth.region_by_slug("nwc"), 2_000, root / "data", seed=5)
    pki = root / "pki"
    create_ca(pki)
    node_id = load_identity(issue(pki, role=Role.NODE, name="nwc"))
    analyst = load_identity(issue(pki, role=Role.ANALYST, name="prober"))
    pathways = load_pathways(None)
    store = OmopStore(root / "data", pathways)
    accountant = MemoryAccountant(
        BudgetPolicy(total_rho=1e6, max_rho_per_query=10.0, lifetime_rho=1e7), node="nwc"
    )
    service = NodeService(
        name="nwc",
        store=store,
        catalog=build_catalog(pathways),
        accountant=accountant,
        ca_pem=node_id.ca_pem,
    )
    server, port = rpc.make_server("127.0.0.1:0", node_id)
    node_pb2_grpc.add_NodeServicer_to_server(service, server)
    server.start()
    late = load_identity(issue(pki, role=Role.ANALYST, name="late"))
    channel = secure_channel(f"127.0.0.1:{port}", analyst, server_name="nwc")
    late_channel = secure_channel(f"127.0.0.1:{port}", late, server_name="nwc")
    try:
        yield Node(
            node_pb2_grpc.NodeStub(channel),
            analyst,
            accountant,
            node_pb2_grpc.NodeStub(late_channel),
            late,
        )
    finally:
        channel.close()
        late_channel.close()
        server.stop(None)
        store.close()


ABSURD = [1e-320, 1e-300, 1e-12, 1e-6, 1e3, 1e308]
SANE = [0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 9.99]
# Absurd numbers a third of the time, so that both outcomes are common.
NUMBERS = st.one_of(st.sampled_from(SANE), st.sampled_from(SANE), st.sampled_from(ABSURD))
BOUNDS = st.sampled_from([-1e300, -5.0, 0.0, 0.4, 2.0, 7.5, 30.0, 120.0, 1e15, 1e300])
COLUMNS = {"persons": ["age"], "visits": ["length_of_stay"]}
GROUPS = {"persons": ["sex", "age_band", "imd_quintile"], "visits": ["visit_type", "year"]}
STATISTICS = [
    "count",
    "count_rows",
    "sum",
    "mean",
    "variance",
    "stddev",
    "median",
    "quantile",
    "histogram",
    "ratio",
]


@st.composite
def specs(draw: st.DrawFn) -> dict[str, object]:
    view = draw(st.sampled_from(sorted(COLUMNS)))
    measures = []
    for i in range(draw(st.integers(1, 4))):
        stat = draw(st.sampled_from(STATISTICS))
        m: dict[str, object] = {"statistic": stat, "name": f"m{i}"}
        if stat not in {"count", "count_rows"}:
            m["column"] = draw(st.sampled_from(COLUMNS[view]))
            if draw(st.integers(0, 3)) == 0:
                m["clamp"] = sorted([draw(BOUNDS), draw(BOUNDS)])
        if stat == "quantile":
            m["quantile"] = draw(st.sampled_from([0.1, 0.5, 0.9]))
        if stat == "histogram" and draw(st.booleans()):
            m["bins"] = draw(st.sampled_from([2, 10, 1000]))
        if draw(st.integers(0, 3)) == 0:
            m["weight"] = draw(NUMBERS)
        measures.append(m)
    group_by = draw(st.lists(st.sampled_from(GROUPS[view]), max_size=2, unique=True))
    spec = {"view": view, "rho": draw(NUMBERS), "measures": measures, "group_by": group_by}
    if draw(st.integers(0, 3)) == 0:
        # An analyst's cap: within the view's (truncated SQL), at it, or above it (refused).
        spec["rows_per_person"] = draw(st.sampled_from([1, 3, 50, 51, 10_000]))
    return spec


def _outcome(node: Node, spec: dict[str, object]) -> str:
    """'answered' or 'refused', checking the invariant either way."""
    body = json.dumps(spec).encode()
    envelope = serde.signed_query_to_proto(sign_query(node.analyst, body))
    before = node.accountant.spent()
    try:
        reply = node.stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=30)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    else:
        code, details = grpc.StatusCode.OK, ""
    if code is not grpc.StatusCode.OK:
        assert code is not grpc.StatusCode.INTERNAL, (spec, details)
        assert "Traceback" not in details
        assert node.accountant.spent() == before, spec
        return "refused"
    release = serde.release_from_proto(reply)
    assert node.accountant.spent() > before
    query = spec_io.from_json(body)
    table = combine.combine(query, [("nwc", release)])
    rules = release.rules or release_rules.NO_RULES
    published = release_rules.apply(table, rules, query.group_by)
    assert published.num_rows == table.num_rows > 0
    return "answered"


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spec=specs())
def test_refused_at_no_cost_or_answered(node: Node, spec: dict[str, object]) -> None:
    event(_outcome(node, spec))


@pytest.mark.parametrize(
    ("rho", "weight", "expected"),
    [
        (0.5, 1.0, "answered"),
        (1e-320, 1.0, "refused"),  # used to be recorded as released, then overflow
        (1e308, 1.0, "refused"),  # used to be an internal error in calibration
        (0.5, 1e-300, "refused"),  # used to charge, then fail at the hub
    ],
)
def test_the_cases_that_used_to_charge_without_answering(
    node: Node, rho: float, weight: float, expected: str
) -> None:
    measures = [
        {"statistic": "count", "name": "n"},
        {"statistic": "mean", "name": "m", "column": "age", "weight": weight},
    ]
    assert _outcome(node, {"view": "persons", "rho": rho, "measures": measures}) == expected


def _slow_spec() -> dict[str, object]:
    """Fifty histograms over distinct clamps: fifty scans of the visits, many ms of work."""
    measures = [
        {
            "statistic": "histogram",
            "name": f"h{i}",
            "column": "length_of_stay",
            "clamp": [0, 10 + i],
        }
        for i in range(50)
    ]
    return {"view": "visits", "rho": 0.5, "measures": measures, "group_by": ["year"]}


def test_a_node_charges_nothing_once_the_deadline_has_passed(node: Node) -> None:
    """With 5,000 measures and a 3 s deadline, every node used to charge after the analyst had
    given up. Now a node checks the propagated deadline before computing and before charging.

    Timing-robust: each call's deadline is a tenth of the query's measured run time, so it
    cannot be met; whether a call is dropped before the handler starts or refused by the
    node, nothing may be charged, and at least one of ten calls must reach the handler.
    """
    spec = _slow_spec()
    assert _outcome(node, spec) == "answered"  # it runs, given time
    started = time.perf_counter()
    _outcome(node, spec)
    took = time.perf_counter() - started
    refused_before = _deadline_refusals(node)
    spent = node.accountant.spent()
    codes = set()
    for _ in range(10):
        envelope = serde.signed_query_to_proto(sign_query(node.late, json.dumps(spec).encode()))
        with pytest.raises(grpc.RpcError) as info:
            node.late_stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=took / 10)
        codes.add(info.value.code())
    assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED}
    time.sleep(2 * took + 0.5)  # let the node finish whatever it started
    assert node.accountant.spent() == spent
    # The node did start the work and refused it itself (recorded at zero cost).
    assert _deadline_refusals(node) > refused_before


def _deadline_refusals(node: Node) -> int:
    bodies = [json.loads(e.body) for e in node.accountant.entries()]
    return sum(1 for b in bodies if b.get("code") == "DEADLINE_EXCEEDED")
