"""An analyst's rows_per_person through the real hub and nodes: Explain, release, refusal, CLI.

Two synthetic regions on loopback (mutual TLS, real node processes, real DuckDB views). The
noise Explain states before anything is spent is the noise the release carries; a cap above
the view's is refused at plan time, at no cost; the released count at a low cap is the
truncated census count (what the node's own views give under the rank rule), plus noise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from coordinator.analyst.client import Federation
from coordinator.cli import app
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from node import engine
from node.data import catalog as cat
from node.data.store import OmopStore
from protocols.cli import ExitCode
from queries import plan
from queries.combine import POOLED
from queries.errors import QueryError
from queries.pathway import load_pathways
from queries.results import NodeStatus
from queries.spec import Filter, Measure, Query, Statistic

pytestmark = pytest.mark.integration

REGIONS = ("nenc", "gm")
CAP = cat.MAX_VISITS_PER_PERSON
RHO = 0.05


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("rows-per-person")
    setups = []
    for slug in REGIONS:
        folder = root / "data" / slug
        synth.generate_region(synth.region_by_slug(slug), 3_000, folder, seed=9)
        setups.append(NodeSetup(name=slug, omop=folder))
    with LocalFederation(workdir=root, nodes=tuple(setups), deadline_ms=10_000) as federation:
        yield federation


def visit_count(cap: int | None) -> Query:
    return Query(
        view="visits",
        rho=RHO,
        measures=(Measure(Statistic.COUNT_ROWS, "visits"),),
        where=(Filter("visit_type", ("outpatient",)),),
        rows_per_person=cap,
    )


def _spent(client: Federation) -> dict[str, float]:
    return {d.node: d.budget.rho_spent for d in client.nodes()[0]}


def test_explain_shows_the_noise_at_the_cap_and_the_release_carries_it(
    fed: LocalFederation,
) -> None:
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        before = _spent(client)
        at_50 = {e.node: e for e in client.explain(visit_count(None))}
        at_3 = {e.node: e for e in client.explain(visit_count(3))}
        assert _spent(client) == before  # explaining spends nothing
        result = client.query(visit_count(3))
        after = _spent(client)
    assert set(at_50) == set(at_3) == set(REGIONS)
    for node in REGIONS:
        assert at_50[node].status is at_3[node].status is NodeStatus.OK
        (wide,) = at_50[node].measures
        (narrow,) = at_3[node].measures
        assert wide.noise.sensitivity == CAP
        assert narrow.noise.sensitivity == 3
        # sigma = sensitivity / sqrt(2 rho): at cap 3, 3/50 of the noise at the view's 50.
        assert wide.noise.scale == pytest.approx(CAP / math.sqrt(2 * RHO), rel=1e-8)
        assert narrow.noise.scale == pytest.approx(wide.noise.scale * 3 / 50, rel=1e-12)
        assert "counting at most 3 of each person's rows" in at_3[node].plan
        assert f"at most {CAP} row(s) per person" in at_50[node].plan
        assert after[node] - before[node] == pytest.approx(RHO, rel=1e-6)
    outcomes = {o.node: o for o in result.nodes}
    for node in REGIONS:
        assert outcomes[node].status is NodeStatus.OK
        # What the node released with is exactly what it said before anything was spent.
        assert outcomes[node].measures == at_3[node].measures
        assert outcomes[node].noise_variance == pytest.approx(at_3[node].measures[0].noise.variance)


def test_the_release_at_a_low_cap_is_the_truncated_count(fed: LocalFederation) -> None:
    """Each region's estimate is within 6 noise sds of its truncated census count (a false
    failure has probability 2e-9 per region); the untruncated count is hundreds of sds away."""
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        result = client.query(visit_count(1))
    rows = {r["region"]: r for r in result.table.to_pylist() if r["measure"] == "visits"}
    sd = 1 / math.sqrt(2 * RHO)
    for setup in fed.nodes:
        store = OmopStore(
            setup.omop, load_pathways(None), reference_date=fed.reference_date, threads=1
        )
        try:
            catalog = cat.build_catalog(load_pathways(None), reference_date=fed.reference_date)
            truncated = engine.exact_values(plan.compile_query(visit_count(1), catalog), store)
            full = engine.exact_values(plan.compile_query(visit_count(None), catalog), store)
        finally:
            store.close()
        (truth,) = truncated["rows"]
        (untruncated,) = full["rows"]
        assert untruncated - truth > 100 * sd, "the data must have persons above the cap"
        assert abs(rows[setup.name]["estimate"] - truth) <= 6 * sd, setup.name
    assert POOLED in rows


def test_a_cap_above_the_views_is_refused_at_no_cost(fed: LocalFederation) -> None:
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        before = _spent(client)
        explains = client.explain(visit_count(CAP + 1))
        with pytest.raises(QueryError) as refused:
            client.query(visit_count(CAP + 1))
        after = _spent(client)
    assert after == before
    for e in explains:
        assert e.status is NodeStatus.REFUSED
        assert f"rows_per_person {CAP + 1}" in e.message
        assert f"at most {CAP} row(s) per person" in e.message
    assert f"rows_per_person {CAP + 1}" in str(refused.value)


def chc(fed: LocalFederation, *args: str) -> Result:
    hub = ["--hub", fed.hub_address, "--identity", str(fed.analyst_identity)]
    return CliRunner().invoke(app, [*args, *hub])


def test_chc_query_rows_per_person(fed: LocalFederation, tmp_path: Path) -> None:
    sql = "SELECT COUNT(*) AS n FROM visits"
    run = chc(fed, "query", "--sql", sql, "--rho", "0.05", "--rows-per-person", "3", "--explain")
    assert run.exit_code == ExitCode.OK, run.output
    assert "counting at most 3 of each person's rows" in run.output
    run = chc(
        fed, "query", "--sql", sql, "--rho", "0.05", "--rows-per-person", "3", "--explain", "--json"
    )
    assert run.exit_code == ExitCode.OK, run.output
    for node in json.loads(run.stdout):
        (component,) = node["components"]
        assert component["sensitivity"] == 3
        assert component["noise_sd"] == pytest.approx(3 / math.sqrt(2 * 0.05), rel=1e-8)
    # Above the view's cap: refused by every node, exit 3, one line naming both numbers.
    run = chc(fed, "query", "--sql", sql, "--rho", "0.05", "--rows-per-person", "51")
    assert run.exit_code == ExitCode.REFUSED, run.output
    assert "rows_per_person 51" in run.stderr
    assert f"at most {CAP} row(s) per person" in run.stderr
    # Out of range, or in conflict with the spec's own cap: a usage error, nothing asked.
    run = chc(fed, "query", "--sql", sql, "--rho", "0.05", "--rows-per-person", "0")
    assert run.exit_code == ExitCode.USAGE, run.output
    assert "--rows-per-person 0 is out of range" in run.stderr
    spec = tmp_path / "q.yaml"
    spec.write_text(
        "view: visits\nrho: 0.05\nrows_per_person: 5\n"
        "measures: [{statistic: count_rows, name: n}]\n",
        encoding="utf-8",
    )
    run = chc(fed, "query", "--spec", str(spec), "--rows-per-person", "3")
    assert run.exit_code == ExitCode.USAGE, run.output
    assert "give the cap once" in run.stderr
    run = chc(fed, "query", "--spec", str(spec), "--explain", "--json")
    assert run.exit_code == ExitCode.OK, run.output
    assert all(n["components"][0]["sensitivity"] == 5 for n in json.loads(run.stdout))
