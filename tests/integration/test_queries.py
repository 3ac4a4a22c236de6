"""SQL queries and cost-before-spend through the real hub and nodes."""

from __future__ import annotations

import pytest

from coordinator.analyst.client import Federation
from coordinator.local.federation import LocalFederation
from queries.combine import POOLED
from queries.errors import QueryError
from queries.results import NodeStatus
from queries.sql import parse_sql

pytestmark = pytest.mark.integration


def _spent(fed: Federation) -> dict[str, float]:
    return {d.node: d.budget.rho_spent for d in fed.nodes()[0]}


def test_sql_query_with_two_measures(federation: LocalFederation) -> None:
    query = parse_sql(
        "SELECT sex, COUNT(DISTINCT person_id) AS persons, COUNT(*) AS rows "
        "FROM persons WHERE sex IN ('female', 'male') GROUP BY sex",
        rho=0.02,
    )
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        before = _spent(fed)
        result = fed.query(query)
        after = _spent(fed)
    assert all(o.status is NodeStatus.OK for o in result.nodes)
    rows = result.table.to_pylist()
    measures = {(r["region"], r["sex"], r["measure"]) for r in rows}
    assert (POOLED, "female", "persons") in measures
    assert (POOLED, "male", "rows") in measures
    assert len(rows) == 5 * 2 * 2
    for node, spent in after.items():
        # Two measures share the query's rho; the node charges exactly that in total.
        assert spent - before[node] == pytest.approx(0.02, rel=1e-6)
    for o in result.nodes:
        assert {m.measure for m in o.measures} == {"persons", "rows"}
        assert sum(m.rho for m in o.measures) == pytest.approx(0.02, rel=1e-6)


def test_explain_shows_cost_and_noise_and_spends_nothing(federation: LocalFederation) -> None:
    query = parse_sql("SELECT age_band, COUNT(*) FROM asthma_children GROUP BY age_band", rho=0.1)
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        before = _spent(fed)
        explains = fed.explain(query)
        again = fed.explain(query)  # explaining the same query twice is fine
        after = _spent(fed)
    assert before == after
    assert len(explains) == len(again) == 4
    for e in explains:
        assert e.status is NodeStatus.OK
        assert e.rho == pytest.approx(0.1, rel=1e-6)
        assert e.cells == 3  # children's age bands: 0-4, 5-11, 12-17
        assert "asthma_children" in e.plan
        (component,) = e.measures
        # sigma = sensitivity / sqrt(2 rho) for the discrete Gaussian.
        assert component.noise.scale == pytest.approx(1 / (2 * 0.1) ** 0.5, rel=1e-6)


def test_explain_refuses_what_execute_would_refuse(federation: LocalFederation) -> None:
    query = parse_sql("SELECT COUNT(*) FROM persons GROUP BY person_id", rho=0.1)
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        explains = fed.explain(query)
        with pytest.raises(QueryError, match="no public domain"):
            fed.query(query)
    assert all(e.status is NodeStatus.REFUSED for e in explains)
    assert all("no public domain" in e.message for e in explains)


def test_a_negative_deadline_is_refused_before_any_node_is_asked(
    federation: LocalFederation,
) -> None:
    """It used to be relayed as a timeout of every node, and the CLI exited 0."""
    query = parse_sql("SELECT COUNT(*) FROM persons", rho=0.01)
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        before = _spent(fed)
        with pytest.raises(QueryError, match="deadline"):
            fed.query(query, deadline_s=-1.0)
        assert _spent(fed) == before
