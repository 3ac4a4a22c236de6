"""Nodes whose catalogs differ are refused before any charge, not after (issue 9, item 9).

Two real nodes serve a pathway of the same name for different ages, so its `age_band`
domain differs: figures grouped by it could not be pooled (queries/combine.py pools by
position). The hub compares the structure of the columns a query reads, from every node's
Describe, before asking any node to run it; each node compares the hub's fingerprint with
its own catalog too, in case the hub's view of it is out of date.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from protocols import serde
from protocols.security.envelope import Audience, sign_query
from protocols.security.pki import load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.errors import ConfigError
from queries.results import NodeStatus
from queries.spec import Query, canonical_bytes
from tests.faults._invariants import ledger_bodies

pytestmark = pytest.mark.integration

# Each node's pathway age_min: nwc's age_band domain differs from the other two's.
AGES = {"nenc": 18, "nwc": 40, "gm": 18}
PATHWAY = """\
name: breathless_adults
title: Breathless adults
conditions: [255573]
entry: condition
age_min: {age_min}
age_max: 120
window_days: 180
"""


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("pooling")
    setups = []
    for slug, age_min in AGES.items():
        folder = root / "data" / slug
        synth.generate_region(synth.region_by_slug(slug), 1_000, folder, seed=9)
        pathways = root / "pathways" / slug
        pathways.mkdir(parents=True)
        (pathways / "breathless_adults.yaml").write_text(
            PATHWAY.format(age_min=age_min), encoding="utf-8"
        )
        setups.append(
            NodeSetup(
                name=slug,
                omop=folder,
                pathways=("breathless_adults",),
                extra_toml=f'pathways_dir = "{pathways}"\n',
            )
        )
    with LocalFederation(workdir=root, nodes=tuple(setups), deadline_ms=10_000) as federation:
        yield federation


def entries(fed: LocalFederation) -> dict[str, int]:
    """How many entries each node's ledger holds (refusals included)."""
    return {s.name: len(ledger_bodies(fed.ledger_path(s.name))) for s in fed.nodes}


def test_a_query_on_columns_that_differ_is_refused_before_any_node_is_asked(
    fed: LocalFederation,
) -> None:
    before = entries(fed)
    query = Query(view="breathless_adults", rho=0.01, group_by=("age_band",))
    with (
        Federation(fed.hub_address, fed.analyst_identity) as client,
        pytest.raises(ConfigError) as info,
    ):
        client.query(query, deadline_s=10)
    message = str(info.value)
    assert "'age_band' differs" in message, message
    assert "nenc" in message, message
    assert "nwc" in message, message
    assert "nothing was charged" in message, message
    # No node was asked: not a charge, not even a refusal, in any ledger.
    assert entries(fed) == before


def test_explain_refuses_what_run_would_refuse_in_the_same_words(fed: LocalFederation) -> None:
    """Explain is the analyst's preview of Run: a query Run would refuse for its pooling is
    refused by Explain too (nothing is spent either way)."""
    query = Query(view="breathless_adults", rho=0.01, group_by=("age_band",))
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        with pytest.raises(ConfigError) as ran:
            client.query(query, deadline_s=10)
        before = entries(fed)
        with pytest.raises(ConfigError) as explained:
            client.explain(query, deadline_s=10)
    assert str(explained.value) == str(ran.value)
    assert entries(fed) == before


def test_a_secure_aggregate_is_pooling_checked_over_its_own_nodes_only(
    fed: LocalFederation,
) -> None:
    """Secure aggregation runs over the nodes its envelope names: a node outside them whose
    catalog differs does not stop it, and one inside does."""
    query = Query(view="breathless_adults", rho=0.01, group_by=("age_band",), pooled_only=True)
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        explained = client.explain(query, nodes=("gm", "nenc"), deadline_s=10)
        result = client.query(query, nodes=("gm", "nenc"), deadline_s=10)
        with pytest.raises(ConfigError) as info:
            client.explain(query, nodes=("gm", "nwc"), deadline_s=10)
    assert {e.node: e.status for e in explained} == {
        "gm": NodeStatus.OK,
        "nenc": NodeStatus.OK,
    }
    assert result.secure_aggregation is not None
    assert result.secure_aggregation.round == ("gm", "nenc")
    assert "'age_band' differs" in str(info.value)


def test_columns_that_agree_still_pool(fed: LocalFederation) -> None:
    # The pathway's sex column is the same at both nodes: its figures pool.
    query = Query(view="breathless_adults", rho=0.01, group_by=("sex",))
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        result = client.query(query, deadline_s=10)
    assert [o.status for o in result.nodes] == [NodeStatus.OK] * len(AGES), result.nodes
    assert result.table.num_rows > 0


def test_a_node_refuses_a_structure_that_is_not_its_own_at_no_cost(fed: LocalFederation) -> None:
    # What a hub with an out-of-date view of the catalogs would send: the other node's
    # fingerprint. The analyst calls the node directly (no hub), as it may.
    identity = load_identity(fed.analyst_identity)
    query = Query(view="breathless_adults", rho=0.01, group_by=("age_band",))
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        found, _ = client.nodes()
    theirs = next(d for d in found if d.node == "nenc").catalog.view(query.view)
    signed = sign_query(identity, canonical_bytes(query), audience=Audience(hub="", nodes=()))
    request = node_pb2.ExecuteRequest(
        envelope=serde.signed_query_to_proto(signed),
        structure=serde.structure_fingerprint(serde.pooling_structure(theirs, query)),
    )
    before = fed_spent(fed)
    channel = secure_channel(f"127.0.0.1:{fed.node_port('nwc')}", identity, server_name="nwc")
    with pytest.raises(grpc.RpcError) as info:
        node_pb2_grpc.NodeStub(channel).Execute(request, timeout=10)
    channel.close()
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "could not be pooled" in (info.value.details() or "")
    assert fed_spent(fed) == before
    # Explain compares the structure too, so it never prices what Execute would refuse.
    channel = secure_channel(f"127.0.0.1:{fed.node_port('nwc')}", identity, server_name="nwc")
    with pytest.raises(grpc.RpcError) as explained:
        node_pb2_grpc.NodeStub(channel).Explain(request, timeout=10)
    channel.close()
    assert explained.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert explained.value.details() == info.value.details()


def fed_spent(fed: LocalFederation) -> dict[str, float]:
    """Each node's released rho, from its ledger file."""
    return {
        name: sum(b["rho"] for b in bodies.values() if b.get("outcome") == "released")
        for name in AGES
        for bodies in [ledger_bodies(fed.ledger_path(name))]
    }


def test_the_fingerprint_ignores_descriptions_but_not_domains(tmp_path: Path) -> None:
    del tmp_path
    from node.data.catalog import person_columns
    from queries.schema import ViewSpec

    query = Query(view="v", rho=0.1, group_by=("age_band",))
    a = ViewSpec("v", "one", person_columns(18, 120))
    b = ViewSpec("v", "another description", person_columns(18, 120))
    c = ViewSpec("v", "one", person_columns(40, 120))
    fp = [serde.structure_fingerprint(serde.pooling_structure(v, query)) for v in (a, b, c)]
    assert fp[0] == fp[1] != fp[2]
