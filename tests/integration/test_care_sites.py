"""Care sites end to end: declared nodes publish `care_site` over Describe and answer a
pathway count grouped by it; a node whose custodian declared none refuses, free of charge.

A real LocalFederation (node and hub processes, mTLS on loopback) over synthetic regions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from statistics import NormalDist

import pytest
from typer.testing import CliRunner

from coordinator.analyst.client import Federation
from coordinator.cli import app
from coordinator.learning.compare import adjusting_model, compare
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from node import engine
from node.data.catalog import build_catalog
from node.data.store import OmopStore
from queries import plan
from queries.pathway import load_pathways
from queries.results import NodeStatus
from queries.spec import Filter, Query

pytestmark = pytest.mark.integration

PERSONS = 200_000
UNDECLARED = "gm"  # its custodian publishes no care sites


# Every declaring node publishes the same list (all the regions' trusts): the hub pools only
# figures of the same public structure, so a federated group-by needs one domain.
CODES = tuple(t.code for t in synth.TRUSTS)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("care_sites")
    folders = synth.generate_federation(PERSONS, root / "data", seed=7)
    setups = tuple(
        NodeSetup(
            name=r.slug,
            omop=folders[r.slug],
            title=r.name,
            extra_toml=(
                "[release]\nsuppress_below = 0\nround_to = 1\n"
                + (
                    ""
                    if r.slug == UNDECLARED
                    else f"[care_sites]\npublish = {list(CODES)!r}\n".replace("'", '"')
                )
            ),
        )
        for r in synth.REGIONS
    )
    # Disclosure rules off, to compare every cell with its exact count: under the default ones
    # (below 8 suppressed, complementary suppression) a trust's cell is hidden, as the other
    # regions' cells of the same trust are near zero and the pooled row is their total.
    rules = "[release]\nsuppress_below = 0\nround_to = 1\n"
    with LocalFederation(
        workdir=root, nodes=setups, deadline_ms=10_000, hub_extra_toml=rules
    ) as fed:
        yield fed


def _exact(fed: LocalFederation, setup: NodeSetup, query: Query) -> dict[str, int]:
    """A node's exact counts by care site, through its internal path, never the wire."""
    pathways = load_pathways(None)
    compiled = plan.compile_query(query, build_catalog(pathways, care_sites=CODES))
    store = OmopStore(setup.omop, pathways, reference_date=fed.reference_date, care_sites=CODES)
    try:
        values = engine.exact_values(compiled, store)["persons"]
    finally:
        store.close()
    return {group[0]: value for group, value in zip(compiled.domain, values, strict=True)}


def test_describe_carries_the_declared_column(federation: LocalFederation) -> None:
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        found, missing = fed.nodes()
    assert not missing
    for description in found:
        copd = description.catalog.view("copd")
        visits = description.catalog.view("visits")
        names = [c.name for c in copd.columns]
        if description.node == UNDECLARED:
            assert "care_site" not in names
            assert "care_site" not in [c.name for c in visits.columns]
            continue
        assert copd.column("care_site").domain == (*CODES, "other", "none")
        assert visits.column("care_site").domain == (*CODES, "other")
    run = CliRunner().invoke(
        app,
        ["nodes", "--hub", federation.hub_address, "--identity", str(federation.analyst_identity)],
    )
    assert run.exit_code == 0, run.output
    assert "care_site" in run.output
    assert "RXL" in run.output  # a declared code of the domain, as `chc nodes` lists it


def test_a_pathway_count_by_care_site(federation: LocalFederation) -> None:
    """Declared nodes answer within z*se of their exact counts; gm refuses and is not charged.

    z keeps the chance that any of the cells falls outside by chance below 1e-6 (union bound;
    the discrete Gaussian is sub-Gaussian with parameter sigma); shown counts are rounded to 5
    (at most 2.5 more) under default rules; this federation's are off.
    """
    query = Query(view="copd", rho=0.05, group_by=("care_site",))
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        before = {d.node: d.budget.rho_spent for d in fed.nodes()[0]}
        result = fed.query(query)
        after = {d.node: d.budget.rho_spent for d in fed.nodes()[0]}
    outcomes = {o.node: o for o in result.nodes}
    refused = outcomes[UNDECLARED]
    assert refused.status is NodeStatus.REFUSED
    assert "has not declared care sites" in refused.message
    assert after[UNDECLARED] == before[UNDECLARED]  # refused at planning, before any charge
    assert result.partial
    rows = [r for r in result.table.to_pylist() if r["region"] in outcomes]
    z = NormalDist().inv_cdf(1 - 1e-6 / (2 * max(len(rows), 1)))
    checked = 0
    for setup in federation.nodes:
        if setup.name == UNDECLARED:
            continue
        assert outcomes[setup.name].status is NodeStatus.OK
        exact = _exact(federation, setup, query)
        mine = {r["care_site"]: r for r in rows if r["region"] == setup.name}
        assert set(mine) == set(exact)  # the public domain: every declared code, other, none
        for site, row in mine.items():
            if row["suppressed"]:
                # With suppress_below = 0 only a negative noisy count is hidden: a trust of
                # another region (exact 0); a region's own trusts have about 200 persons each.
                assert exact[site] == 0, row
                continue
            assert abs(row["estimate"] - exact[site]) <= z * row["std_error"] + 2.5, (site, row)
            checked += exact[site] > 0
        assert math.isclose(outcomes[setup.name].rho_charged, 0.05, rel_tol=1e-6)
    assert checked == 20  # each declaring region's own trusts (5, 10, 5) have persons


def test_a_care_site_comparison_leaves_out_the_undeclared_node_at_no_cost(
    federation: LocalFederation,
) -> None:
    """gm refuses the fit at its design check (no care_site in its catalog), charged nothing;
    the others fit it, region effect and all, and every declared trust is a unit."""
    model = adjusting_model(
        "copd",
        "admitted",
        ["age_band", "sex", "region"],
        by="care_site",
        where=(Filter("sex", ("female", "male")), Filter("age_band", ("40-64", "65-79", "80+"))),
    )
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        before = {d.node: d.budget.rho_spent for d in fed.nodes()[0]}
        result = compare(fed, model, by="care_site")
        after = {d.node: d.budget.rho_spent for d in fed.nodes()[0]}
    outcomes = {o.node: o for o in result.fit.nodes}
    assert outcomes[UNDECLARED].status is NodeStatus.REFUSED
    assert "has not declared care sites" in outcomes[UNDECLARED].message
    assert after[UNDECLARED] == before[UNDECLARED]
    assert result.fit.partial
    for name, o in outcomes.items():
        if name != UNDECLARED:
            assert o.status is NodeStatus.OK
            assert after[name] - before[name] == pytest.approx(model.rho, rel=1e-6)
    # Every node publishes all the regions' trusts: each is one unit, summed over the nodes.
    assert [u.unit for u in result.units] == [*CODES, "other", "none"]
    shown = [u for u in result.units if not u.flag.startswith("suppressed")]
    assert {u.unit for u in shown} >= {t.code for t in synth.TRUSTS if t.region != UNDECLARED}
    # No per-node totals beside the units (a suppressed unit must not be one subtraction away).
    assert result.fit.node_totals == ()
