"""End to end: real node and hub processes on loopback, mutual TLS, signed queries."""

from __future__ import annotations

import functools
import math
import time
from datetime import date
from statistics import NormalDist

import duckdb
import grpc
import pytest

from coordinator.analyst.client import Federation, HubUnavailableError
from coordinator.local import synth
from coordinator.local.federation import AUDITOR_NAME, LocalFederation
from node import engine
from node.data.catalog import build_catalog
from node.data.store import OmopStore
from protocols import serde
from protocols.security.envelope import sign_query
from protocols.security.pki import CA_FILE, Identity, Role, create_ca, issue, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import hub_pb2, hub_pb2_grpc, node_pb2, node_pb2_grpc
from queries import plan
from queries.combine import POOLED, Z95
from queries.errors import (
    AuthenticationError,
    BudgetExceededError,
    PermissionDeniedError,
    QueryError,
)
from queries.pathway import load_pathways
from queries.results import NodeStatus
from queries.spec import Filter, Query, canonical_bytes

pytestmark = pytest.mark.integration


def _exact_counts(fed: LocalFederation, query: Query) -> dict[tuple[str, ...], int]:
    """Exact counts per (region, *groups) through the node's internal path, never the wire."""
    pathways = load_pathways(None)
    catalog = build_catalog(pathways)
    compiled = plan.compile_query(query, catalog)
    exact: dict[tuple[str, ...], int] = {}
    for setup in fed.nodes:
        store = OmopStore(setup.omop, pathways, reference_date=fed.reference_date)
        values = engine.exact_values(compiled, store)["persons"]
        store.close()
        for group, value in zip(compiled.domain, values, strict=True):
            exact[(setup.name, *group)] = value
    for key in [k for k in exact]:
        pooled = (POOLED, *key[1:])
        exact[pooled] = exact.get(pooled, 0) + exact[key]
    return exact


def test_federated_count_matches_exact_within_interval(federation: LocalFederation) -> None:
    """Every region's and the pooled estimate lies within z*se of the exact count.

    z is chosen so that the chance of any of the K cells falling outside by chance is below
    1e-6 in total (union bound; discrete Gaussian tails are sub-Gaussian with parameter sigma).
    Shown counts are rounded to 5 (release rules), which moves them by at most 2.5 more, and
    a cell is suppressed only if its noisy count is below 8, which for a true count of 8 +
    6 sigma or more happens with probability below 1e-9.
    """
    query = Query(
        view="asthma_children",
        rho=0.05,
        group_by=("sex",),
        where=(Filter("sex", ("female", "male")),),
    )
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        result = fed.query(query)
    assert not result.partial
    assert [o.status for o in result.nodes] == [NodeStatus.OK] * 4
    exact = _exact_counts(federation, query)
    rows = result.table.to_pylist()
    assert len(rows) == 5 * 2  # four regions and the pooled row, two sexes each
    z = NormalDist().inv_cdf(1 - 1e-6 / (2 * len(rows)))
    sigma = math.sqrt(result.nodes[0].noise_variance)
    for row in rows:
        truth = exact[(row["region"], row["sex"])]
        assert truth > 10  # seeded synthetic data: every region has children with asthma
        if row["suppressed"]:
            # Small (primary) or hidden to protect a small cell of its group (complementary).
            continue
        assert abs(row["estimate"] - truth) <= z * row["std_error"] + 2.5, row
        assert row["estimate"] % 5 == 0
    pooled = [r for r in rows if r["region"] == POOLED]
    for r in pooled:
        # Four nodes' independent noise (sd below 5, so each node rounds its counts to 5 and
        # the hub widens each sd by the rounding's bound, 2.5 / z): the pooled variance is the
        # sum of theirs.
        assert r["std_error"] == pytest.approx(2 * (sigma + 2.5 / Z95))
        assert r["ci_low"] <= r["estimate"] <= r["ci_high"]
    for o in result.nodes:
        # Each node's receipt reaches the analyst through the hub.
        assert o.ledger_sequence > 0
        assert len(o.node_query_id) == 32
        assert o.rho_charged == pytest.approx(0.05, rel=1e-6)
        assert o.budget is not None
        assert o.budget.rho_spent >= o.rho_charged


def test_exact_path_agrees_with_raw_duckdb(federation: LocalFederation) -> None:
    """The node's persons view counts the same people as a hand-written query on the files."""
    query = Query(view="persons", rho=0.01, group_by=("sex",))
    exact = _exact_counts(federation, query)
    setup = federation.nodes[0]
    ref = federation.reference_date
    raw = duckdb.execute(
        "SELECT CASE gender_concept_id WHEN 8532 THEN 'female' WHEN 8507 THEN 'male' END AS sex,"
        " count(*) AS n FROM read_parquet(?)"
        " WHERE make_date(year_of_birth, coalesce(month_of_birth, 7), coalesce(day_of_birth, 1))"
        " <= ? GROUP BY 1",
        [str(setup.omop / "person.parquet"), ref],
    ).fetchall()
    assert raw
    for sex, n in raw:
        assert exact[(setup.name, sex)] == n


def test_refused_query_is_invalid_argument_and_costs_nothing(
    federation: LocalFederation,
) -> None:
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        before = {d.node: d.budget.rho_spent for d in fed.nodes()[0]}
        with pytest.raises(QueryError, match="did you mean 'asthma_children'"):
            fed.query(Query(view="asthma_child", rho=0.05))
        with pytest.raises(QueryError, match="per-query cap"):
            fed.query(Query(view="persons", rho=5.0))
        with pytest.raises(QueryError, match="no public domain"):
            fed.query(Query(view="persons", rho=0.01, group_by=("person_id",)))
        after = {d.node: d.budget.rho_spent for d in fed.nodes()[0]}
    assert before == after


def test_client_without_certificate_is_refused(federation: LocalFederation) -> None:
    """Plaintext, and TLS without a client certificate, both fail (gRPC says UNAVAILABLE)."""
    ca = (federation.pki / CA_FILE).read_bytes()
    targets = [
        (f"127.0.0.1:{federation.node_port('nwc')}", "nwc", "node"),
        (federation.hub_address, "hub", "hub"),
    ]
    for address, server_name, kind in targets:
        plain = grpc.insecure_channel(address)
        tls_only = grpc.secure_channel(
            address,
            grpc.ssl_channel_credentials(root_certificates=ca),
            options=(("grpc.ssl_target_name_override", server_name),),
        )
        for channel in (plain, tls_only):
            call = (
                functools.partial(
                    node_pb2_grpc.NodeStub(channel).Describe, node_pb2.DescribeRequest()
                )
                if kind == "node"
                else functools.partial(
                    hub_pb2_grpc.HubStub(channel).ListNodes, hub_pb2.ListNodesRequest()
                )
            )
            with pytest.raises(grpc.RpcError) as info:
                call(timeout=5)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            channel.close()


def test_certificate_from_another_ca_is_refused(
    federation: LocalFederation, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rogue = tmp_path_factory.mktemp("rogue")
    create_ca(rogue)
    ident_dir = issue(rogue, role=Role.ANALYST, name="demo-analyst")
    rogue_identity = load_identity(ident_dir)
    # Trust the real CA for the server, but present a certificate the federation never issued.
    identity = Identity(
        name=rogue_identity.name,
        role=rogue_identity.role,
        cert_pem=rogue_identity.cert_pem,
        key_pem=rogue_identity.key_pem,
        ca_pem=(federation.pki / CA_FILE).read_bytes(),
    )
    with Federation(federation.hub_address, identity) as fed, pytest.raises(HubUnavailableError):
        fed.query(Query(view="persons", rho=0.01))


def test_auditor_cannot_submit_queries(federation: LocalFederation) -> None:
    auditor = federation.identity_dir(Role.AUDITOR, AUDITOR_NAME)
    identity = load_identity(auditor)
    channel = secure_channel(federation.hub_address, identity, server_name="hub")
    analyst = load_identity(federation.analyst_identity)
    signed = sign_query(analyst, canonical_bytes(Query(view="persons", rho=0.01)))
    with pytest.raises(grpc.RpcError) as info:
        hub_pb2_grpc.HubStub(channel).Submit(
            hub_pb2.SubmitRequest(envelope=serde.signed_query_to_proto(signed)), timeout=10
        )
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "only analysts" in (info.value.details() or "")
    channel.close()


def test_retried_envelope_is_answered_once_by_the_node(federation: LocalFederation) -> None:
    analyst = load_identity(federation.analyst_identity)
    channel = secure_channel(f"127.0.0.1:{federation.node_port('yh')}", analyst, server_name="yh")
    stub = node_pb2_grpc.NodeStub(channel)
    signed = sign_query(analyst, canonical_bytes(Query(view="persons", rho=0.01)))
    request = node_pb2.ExecuteRequest(envelope=serde.signed_query_to_proto(signed))
    first = stub.Execute(request, timeout=10)
    spent = first.budget.rho_spent
    again = stub.Execute(request, timeout=10)
    assert again.resent
    assert again.table == first.table
    after = stub.Describe(node_pb2.DescribeRequest(), timeout=10)
    assert after.budget.rho_spent == pytest.approx(spent)
    channel.close()


def test_stopped_node_makes_the_result_partial(fresh_federation: LocalFederation) -> None:
    fresh_federation.stop_process("gm")
    query = Query(view="persons", rho=0.1, group_by=("sex",))
    started = time.monotonic()
    with Federation(fresh_federation.hub_address, fresh_federation.analyst_identity) as fed:
        result = fed.query(query, deadline_s=5.0)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0 + 2.0
    assert result.partial
    status = {o.node: o.status for o in result.nodes}
    assert status == {
        "nenc": NodeStatus.OK,
        "nwc": NodeStatus.OK,
        "yh": NodeStatus.OK,
        "gm": NodeStatus.UNREACHABLE,
    }
    gm = next(o for o in result.nodes if o.node == "gm")
    assert "unreachable" in gm.message
    regions = set(result.table.column("region").to_pylist())
    assert regions == {"nenc", "nwc", "yh", POOLED}


def test_budget_is_enforced_and_never_exceeded(fresh_federation: LocalFederation) -> None:
    """Total 1.0 at each node: two queries of 0.5 pass, the third is refused everywhere."""
    with Federation(fresh_federation.hub_address, fresh_federation.analyst_identity) as fed:
        for _ in range(2):
            assert not fed.query(Query(view="persons", rho=0.5)).partial
        with pytest.raises(BudgetExceededError, match="remaining budget"):
            fed.query(Query(view="persons", rho=0.5))
        budgets = [d.budget for d in fed.nodes()[0]]
    assert all(b.rho_spent <= b.rho_total for b in budgets)
    assert all(b.rho_spent == pytest.approx(1.0) for b in budgets)


def test_hub_refuses_an_analyst_relaying_someone_elses_envelope(
    federation: LocalFederation,
) -> None:
    other_dir = issue(federation.pki, role=Role.ANALYST, name="other-analyst")
    other = load_identity(other_dir)
    analyst = load_identity(federation.analyst_identity)
    signed = sign_query(analyst, canonical_bytes(Query(view="persons", rho=0.01)))
    channel = secure_channel(federation.hub_address, other, server_name="hub")
    with pytest.raises(grpc.RpcError) as info:
        hub_pb2_grpc.HubStub(channel).Submit(
            hub_pb2.SubmitRequest(envelope=serde.signed_query_to_proto(signed)), timeout=10
        )
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_node_identity_cannot_query(federation: LocalFederation) -> None:
    node_identity = load_identity(federation.identity_dir(Role.NODE, "nenc"))
    with pytest.raises(Exception) as info:  # noqa: PT011 - either layer may refuse
        Federation(federation.hub_address, node_identity).query(Query(view="persons", rho=0.01))
    assert isinstance(info.value, PermissionDeniedError | AuthenticationError)


def test_reference_date_is_the_synth_one(federation: LocalFederation) -> None:
    # The demo's synthetic data and the nodes must agree on "today" for ages to be right.
    assert federation.reference_date == date(2025, 12, 31)
    assert {r.slug for r in synth.REGIONS} == {n.name for n in federation.nodes}
