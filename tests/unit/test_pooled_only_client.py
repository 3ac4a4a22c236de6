"""The Python client's side of secure aggregation: a pooled_only envelope names its nodes.

The client talks over real mutual TLS to a recording hub (a gRPC Hub servicer on loopback,
with certificates from a real federation CA) that lists the nodes it is told to and keeps
every request: enough to check what the client signs and sends, with the real signature
and audience checks a node runs. The real hub and nodes are the lead's integration tests.
Also here: a secure aggregate and its Explanation as frames and notebook HTML.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest

from coordinator.analyst.client import Federation, with_secure_aggregation
from protocols import serde
from protocols.security.envelope import (
    Audience,
    Operation,
    check_audience,
    sign_query,
    verify_analyst,
)
from protocols.security.pki import CA_FILE, Role, create_ca, issue, load_identity
from protocols.security.tls import server_credentials
from protocols.v1 import hub_pb2, hub_pb2_grpc, node_pb2
from protocols.version import CURRENT
from queries.combine import POOLED
from queries.errors import AuthenticationError, QueryError
from queries.results import (
    BudgetStatus,
    Explanation,
    FederatedResult,
    MeasureNoise,
    NodeExplain,
    NodeStatus,
    NoiseInfo,
    SecureAggregation,
    ShareNoise,
)
from queries.spec import Query, canonical_bytes
from queries.spec_io import from_json
from tests.unit._present_helpers import federated

BUDGET = BudgetStatus(rho_total=10.0, rho_spent=1.0, max_rho_per_query=1.0, delta=1e-6)
POOLED_QUERY = Query(view="persons", rho=0.1, pooled_only=True)
PLAIN_QUERY = Query(view="persons", rho=0.1)


def guarantee(k: int = 4, t: int | None = None) -> SecureAggregation:
    """A count's secure-aggregation guarantee over k nodes: upscale 10, and shares sized so
    that the pooled sum's noise variance is 25 (sd 5), whatever k."""
    t = k if t is None else t
    share = ShareNoise(
        component="persons",
        length=2,
        upscale=10,
        share_scale=50 / math.sqrt(k),
        unit=1.0,
        rho=0.1,
        rho_threshold=0.1,
        rho_all_honest=0.1 * t / k,
    )
    names = tuple(f"n{i}" for i in range(k))
    return SecureAggregation(k, t, 0.1, 0.1 * t / k, (share,), names)


def secure_result() -> FederatedResult:
    """A secure aggregate as the hub returns it: the pooled rows only, and its guarantee."""
    full = federated({"leeds": [40, 60], "york": [20, 30]})
    keep = [r == POOLED for r in full.table.column("region").to_pylist()]
    pooled = full.table.filter(keep)
    return replace(full, table=pooled, secure_aggregation=guarantee(2))


def _noise(variance: float) -> NoiseInfo:
    return NoiseInfo("discrete_gaussian", math.sqrt(variance), variance, 1.0)


def secure_explanation(k: int = 4) -> Explanation:
    """k nodes' Explain of a pooled_only count: per-node variance 25, pooled secure 25.

    Per-node noise pools to k * 25, so the per-node pooled sd is sqrt(k) times the secure one.
    """
    nodes = tuple(
        NodeExplain(
            node=f"n{i}",
            status=NodeStatus.OK,
            plan="SELECT ...",
            measures=(MeasureNoise("persons", "count", _noise(25.0), 0.1),),
            rho=0.1,
            epsilon=1.2,
            cells=2,
            budget=BUDGET,
            secure_measures=(MeasureNoise("persons", "count", _noise(25.0), 0.1),),
            secure_aggregation=guarantee(k),
        )
        for i in range(k)
    )
    return Explanation((*nodes, NodeExplain(node="zz", status=NodeStatus.REFUSED, message="no")))


@dataclass
class RecordingHub(hub_pb2_grpc.HubServicer):
    """A hub that lists the nodes it is given and keeps every Submit and Explain request."""

    listed: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)
    lists: int = 0
    submits: list[hub_pb2.SubmitRequest] = field(default_factory=list)
    explains: list[hub_pb2.SubmitRequest] = field(default_factory=list)

    def ListNodes(  # noqa: N802 - gRPC method name
        self, _request: hub_pb2.ListNodesRequest, _context: grpc.ServicerContext
    ) -> hub_pb2.ListNodesResponse:
        self.lists += 1
        return hub_pb2.ListNodesResponse(
            nodes=[
                node_pb2.DescribeResponse(
                    node=n, protocol_version=str(CURRENT), budget=serde.budget_to_proto(BUDGET)
                )
                for n in self.listed
            ],
            unavailable=[
                hub_pb2.NodeOutcome(node=n, status=NodeStatus.UNREACHABLE.value)
                for n in self.unavailable
            ],
        )

    def Submit(  # noqa: N802 - gRPC method name
        self, request: hub_pb2.SubmitRequest, _context: grpc.ServicerContext
    ) -> hub_pb2.SubmitResponse:
        self.submits.append(request)
        return serde.result_to_proto(secure_result())

    def Explain(  # noqa: N802 - gRPC method name
        self, request: hub_pb2.SubmitRequest, _context: grpc.ServicerContext
    ) -> hub_pb2.ExplainFederatedResponse:
        self.explains.append(request)
        return hub_pb2.ExplainFederatedResponse(
            nodes=[serde.explain_to_proto(e) for e in secure_explanation()]
        )

    def Fit(  # noqa: N802 - gRPC method name
        self, _request: hub_pb2.SubmitRequest, context: grpc.ServicerContext
    ) -> hub_pb2.FitResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not a fitting hub")

    def Train(  # noqa: N802 - gRPC method name
        self, _request: hub_pb2.SubmitRequest, context: grpc.ServicerContext
    ) -> hub_pb2.TrainResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not a training hub")


@dataclass
class Setup:
    hub: RecordingHub
    fed: Federation
    ca_pem: bytes
    pki: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    pki = tmp_path_factory.mktemp("pki")
    create_ca(pki)
    issue(pki, role=Role.HUB, name="hub", out_dir=pki / "hub")
    issue(pki, role=Role.ANALYST, name="alice", out_dir=pki / "alice")
    recording = RecordingHub()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    hub_pb2_grpc.add_HubServicer_to_server(recording, server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(load_identity(pki / "hub")))
    server.start()
    fed = Federation(f"127.0.0.1:{port}", pki / "alice")
    try:
        yield Setup(recording, fed, (pki / CA_FILE).read_bytes(), pki)
    finally:
        fed.close()
        server.stop(None)


@pytest.fixture
def hub(setup: Setup) -> RecordingHub:
    """The recording hub, emptied, listing york, leeds and gm (in that order)."""
    setup.hub.listed = ["york", "leeds", "gm"]
    setup.hub.unavailable = []
    setup.hub.lists = 0
    setup.hub.submits.clear()
    setup.hub.explains.clear()
    return setup.hub


def _audience(request: hub_pb2.SubmitRequest) -> Audience:
    return serde.signed_query_from_proto(request.envelope).audience


def test_a_pooled_only_query_is_signed_for_every_listed_node_sorted(
    setup: Setup, hub: RecordingHub
) -> None:
    result = setup.fed.query(POOLED_QUERY)
    assert hub.lists == 1
    [request] = hub.submits
    signed = serde.signed_query_from_proto(request.envelope)
    assert signed.audience == Audience(hub="hub", nodes=("gm", "leeds", "york"))
    assert signed.operation is Operation.EXECUTE
    assert from_json(signed.query) == POOLED_QUERY
    # The node's own checks: a valid signature, and every named node accepts it via the hub.
    verify_analyst(signed, setup.ca_pem)
    for node in ("gm", "leeds", "york"):
        check_audience(signed, node=node, hub="hub")
    with pytest.raises(AuthenticationError, match="not to 'wales'"):
        check_audience(signed, node="wales", hub="hub")
    # The hub's answer comes back a secure aggregate.
    assert result.secure_aggregation == guarantee(2)
    assert set(result.table.column("region").to_pylist()) == {POOLED}


def test_other_queries_are_signed_as_before_without_listing_nodes(
    setup: Setup, hub: RecordingHub
) -> None:
    setup.fed.query(PLAIN_QUERY)
    setup.fed.explain(PLAIN_QUERY)
    assert hub.lists == 0
    for request in (*hub.submits, *hub.explains):
        assert _audience(request) == Audience(hub="hub")
        assert not request.envelope.audience.nodes
        assert serde.signed_query_from_proto(request.envelope).query == canonical_bytes(PLAIN_QUERY)


def test_the_nodes_a_caller_gives_are_used_deduplicated_and_sorted(
    setup: Setup, hub: RecordingHub
) -> None:
    setup.fed.query(POOLED_QUERY, nodes=["york", "gm", "york"])
    assert hub.lists == 0
    assert _audience(hub.submits[0]).nodes == ("gm", "york")


def test_nodes_that_do_not_answer_are_left_out(setup: Setup, hub: RecordingHub) -> None:
    hub.unavailable = ["wales"]
    setup.fed.query(POOLED_QUERY)
    assert _audience(hub.submits[0]).nodes == ("gm", "leeds", "york")


def test_fewer_than_two_nodes_is_refused_before_signing(setup: Setup, hub: RecordingHub) -> None:
    hub.listed, hub.unavailable = ["leeds"], ["york"]
    with pytest.raises(QueryError, match="secure aggregation needs at least 2 nodes") as info:
        setup.fed.query(POOLED_QUERY)
    # It names the one node listed and the one that did not answer.
    assert "leeds" in str(info.value)
    assert "york unreachable" in str(info.value)
    with pytest.raises(QueryError, match="at least 2 nodes; nodes= names 1 \\(gm\\)"):
        setup.fed.query(POOLED_QUERY, nodes=["gm", "gm"])
    with pytest.raises(QueryError, match="at least 2 nodes"):
        setup.fed.explain(POOLED_QUERY)
    with pytest.raises(QueryError, match="at least 2 nodes"):
        setup.fed.sign(POOLED_QUERY)
    assert not hub.submits
    assert not hub.explains


def test_honest_nodes_above_the_number_of_nodes_is_refused(setup: Setup, hub: RecordingHub) -> None:
    with pytest.raises(QueryError, match="honest_nodes 4 is more than the 3 nodes"):
        setup.fed.query(POOLED_QUERY, honest_nodes=4)
    setup.fed.query(POOLED_QUERY, honest_nodes=3)
    assert from_json(hub.submits[0].envelope.query).honest_nodes == 3


def test_the_keywords_replace_the_spec_fields(setup: Setup, hub: RecordingHub) -> None:
    setup.fed.query(PLAIN_QUERY, pooled_only=True, honest_nodes=2)
    sent = from_json(hub.submits[0].envelope.query)
    assert (sent.pooled_only, sent.honest_nodes) == (True, 2)
    assert _audience(hub.submits[0]).nodes == ("gm", "leeds", "york")
    # pooled_only=False turns a pooled query back into a per-region one, with no nodes named.
    setup.fed.query(replace(POOLED_QUERY, honest_nodes=2), pooled_only=False)
    sent = from_json(hub.submits[1].envelope.query)
    assert (sent.pooled_only, sent.honest_nodes) == (False, None)
    assert _audience(hub.submits[1]).nodes == ()


def test_with_secure_aggregation_keeps_what_is_not_given() -> None:
    pooled = replace(POOLED_QUERY, honest_nodes=2)
    assert with_secure_aggregation(pooled) is pooled
    assert with_secure_aggregation(pooled, pooled_only=True) == pooled
    assert with_secure_aggregation(pooled, honest_nodes=3).honest_nodes == 3
    with pytest.raises(QueryError, match="honest_nodes only goes with pooled_only"):
        with_secure_aggregation(PLAIN_QUERY, honest_nodes=2)


def test_explain_of_a_pooled_only_query_names_the_nodes_and_keeps_both_noises(
    setup: Setup, hub: RecordingHub
) -> None:
    explanation = setup.fed.explain(PLAIN_QUERY, pooled_only=True)
    [request] = hub.explains
    signed = serde.signed_query_from_proto(request.envelope)
    assert signed.operation is Operation.EXPLAIN
    assert signed.audience.nodes == ("gm", "leeds", "york")
    assert explanation[0].secure_aggregation == guarantee(4)
    assert explanation[0].secure_measures[0].noise.variance == 25.0


def test_run_refuses_a_pooled_only_envelope_that_names_no_nodes(
    setup: Setup, hub: RecordingHub
) -> None:
    # Signed without Federation.sign, which would have named the nodes.
    signed = sign_query(
        setup.fed.identity,
        canonical_bytes(POOLED_QUERY),
        operation=Operation.EXECUTE,
        audience=Audience(hub="hub"),
        ttl_ms=60_000,
    )
    with pytest.raises(QueryError, match="pooled_only but names 0 node"):
        setup.fed.run(serde.signed_query_to_proto(signed))
    assert not hub.submits
    # One Federation.sign made runs, and names the nodes.
    setup.fed.run(setup.fed.sign(POOLED_QUERY))
    assert _audience(hub.submits[0]).nodes == ("gm", "leeds", "york")


def test_a_secure_aggregate_as_frames() -> None:
    result = secure_result()
    arrow = result.to_arrow()
    assert set(arrow.column("region").to_pylist()) == {POOLED}
    assert arrow.num_rows == 2
    assert arrow.column("node_status").to_pylist() == ["ok", "ok"]
    # The pooled row's rho_spent is the sum of the nodes' charges, as for any result.
    assert arrow.column("rho_spent").to_pylist() == pytest.approx([0.2, 0.2])
    assert list(result.to_pandas().columns) == arrow.column_names


def test_a_secure_aggregate_in_a_notebook_says_so_with_its_guarantee() -> None:
    result = replace(secure_result(), secure_aggregation=guarantee(4, 3))
    html = result._repr_html_()
    assert "Secure aggregate (pooled rows only)" in html
    assert "secure aggregation over 4 nodes (shares assume 3 honest)" in html
    assert "rho 0.1 if only 3 are honest, 0.075 if all are" in html
    assert len(re.findall(r'<tr class="pooled"', html)) == 2
    assert not re.findall(r'<tr class="region"', html)
    # Only the pooled panel is charted.
    assert re.findall(r'<g class="panel( pooled)?"', html) == [" pooled"]
    plain = federated({"leeds": [40, 60], "york": [20, 30]})._repr_html_()
    assert "Secure aggregate" not in plain


def test_an_explanation_frame_has_the_secure_noise_when_there_is_one() -> None:
    rows = secure_explanation(4).to_arrow().to_pylist()
    assert [r["noise_sd"] for r in rows] == [5.0] * 4 + [None]
    assert [r["secure_noise_sd"] for r in rows] == [5.0] * 4 + [None]
    plain = Explanation(tuple(replace(e, secure_measures=()) for e in secure_explanation(2)))
    assert [r["secure_noise_sd"] for r in plain.to_arrow().to_pylist()] == [None] * 3


def test_an_explanation_in_a_notebook_compares_both_pooled_noises() -> None:
    html = secure_explanation(4)._repr_html_()
    # Per-node noise pools to sqrt(4 * 25) = 10 against secure aggregation's 5: twice as wide.
    row = re.search(r'<tr data-component="persons">(.*?)</tr>', html)
    assert row is not None
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", row.group(1))
    assert cells == ["persons", "count", "10 (4 nodes)", "5", "2x"]
    assert (
        "secure aggregation over 4 nodes (shares assume all 4 honest): rho 0.1; "
        "the hub would see only the masked vectors and their sum"
    ) in html
    plain = Explanation(tuple(replace(e, secure_measures=()) for e in secure_explanation(2)))
    assert "chc-secure" not in plain._repr_html_()
