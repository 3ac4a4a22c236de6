"""The proof that opt-outs (node.data.consent) hold beneath every view.

For persons chosen to touch every view (cohort members, heavy users, a child whose parent
opted out), the node's views over the data with that person plus their opt-out are identical,
row for row, to the views over the data without them. Identical multisets of rows give
identical exact aggregates of every kind; the test also runs the query engine's exact path
over every public column of every view to show it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from coordinator.local import synth
from node import engine
from node.data.catalog import build_catalog
from node.data.consent import ConsentPolicy
from node.data.store import OmopStore
from queries import plan
from queries.pathway import load_pathways
from queries.schema import Catalog, ColumnType, ViewSpec
from queries.spec import Measure, Query, Statistic
from tests.unit._consent_helpers import register
from tests.unit.omop_testdata import REF

PATHWAYS = load_pathways(None)


def snapshot(store: OmopStore) -> dict[str, Counter[tuple[Any, ...]]]:
    """Every view as a multiset of rows."""
    return {
        name: Counter(tuple(r.values()) for r in store.query(f'SELECT * FROM "{name}"').to_pylist())  # noqa: S608
        for name in store.tables()
    }


def queries_over(view: ViewSpec) -> list[Query]:
    """Counts by every public column and pair of columns, and sums of every bounded column."""
    categories = [c.name for c in view.columns if c.type is ColumnType.CATEGORY]
    numbers = [c.name for c in view.columns if c.bounded]
    out = [Query(view=view.name, rho=1.0)]
    out += [Query(view=view.name, rho=1.0, group_by=(c,)) for c in categories]
    out += [
        Query(view=view.name, rho=1.0, group_by=p)
        for p in itertools.combinations(categories[:4], 2)
    ]
    out += [
        Query(
            view=view.name,
            rho=1.0,
            group_by=(c,),
            measures=tuple(Measure(Statistic.SUM, f"s{i}", n) for i, n in enumerate(numbers)),
        )
        for c in categories[:2]
        if numbers
    ]
    out += [
        Query(view=view.name, rho=1.0, measures=(Measure(Statistic.COUNT_ROWS, "rows"),)),
    ]
    return out


def exact_aggregates(store: OmopStore, catalog: Catalog) -> dict[str, dict[str, list[int]]]:
    results: dict[str, dict[str, list[int]]] = {}
    for view in catalog.views:
        for query in queries_over(view):
            compiled = plan.compile_query(query, catalog)
            results[compiled.describe()] = engine.exact_values(compiled, store)
    return results


def without(folder: Path, out: Path, pid: int) -> Path:
    """A copy of a Parquet OMOP folder without any row about person pid."""
    out.mkdir(parents=True)
    for f in folder.glob("*.parquet"):
        table = pq.read_table(f)
        if "person_id" in table.column_names:
            table = table.filter(pc.not_equal(table.column("person_id"), pid))
        pq.write_table(table, out / f.name)
    return out


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("region") / "nwc"
    synth.generate_region(synth.region_by_slug("nwc"), 4_000, folder, seed=3)
    return folder


def chosen_persons(folder: Path) -> dict[str, int]:
    """One person per view (and the heaviest user of visits), from the exact views."""
    store = OmopStore(folder, PATHWAYS, reference_date=REF, threads=1)
    try:
        picks = {
            view: int(
                store.query(
                    f'SELECT person_id FROM "{view}" ORDER BY admissions DESC, '  # noqa: S608
                    "ed_attendances DESC, person_id LIMIT 1"
                ).to_pylist()[0]["person_id"]
            )
            for view in ("asthma_children", "copd", "epilepsy", "alcohol_liver", "urgent_care")
        }
        picks["visits"] = int(
            store.query(
                "SELECT person_id FROM visits GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
            ).to_pylist()[0]["person_id"]
        )
    finally:
        store.close()
    return picks


def test_an_opted_out_person_changes_no_exact_aggregate_of_any_view(
    region: Path, tmp_path: Path
) -> None:
    lookup = region / synth.LOOKUP_FILE
    catalog = build_catalog(PATHWAYS, reference_date=REF)
    picks = chosen_persons(region)
    assert len(set(picks.values())) >= 4  # the picks are spread over several persons
    views_of: dict[int, list[str]] = {}
    for what, pid in picks.items():
        views_of.setdefault(pid, []).append(what)
    everyone = OmopStore(region, PATHWAYS, reference_date=REF, threads=1, imd_lookup=lookup)
    full = snapshot(everyone)
    everyone.close()
    for pid, views in sorted(views_of.items()):
        # The person's own opt-out, and a parent's: whichever applies at their age.
        reg = register(
            tmp_path / f"optout-{pid}.csv",
            [
                (pid, "2024-01-01", "ndoo", "", "", ""),
                (pid, "2024-01-01", "ndoo", "", "parent", ""),
            ],
        )
        with_optout = OmopStore(
            region,
            PATHWAYS,
            reference_date=REF,
            threads=1,
            imd_lookup=lookup,
            consent=ConsentPolicy(registers=(reg,)),
        )
        removed = OmopStore(
            without(region, tmp_path / f"without-{pid}", pid),
            PATHWAYS,
            reference_date=REF,
            threads=1,
            imd_lookup=lookup,
        )
        try:
            opted_out = snapshot(with_optout)
            assert opted_out == snapshot(removed), views
            assert exact_aggregates(with_optout, catalog) == exact_aggregates(removed, catalog)
            # ...and the person did count before opting out, so the test has teeth.
            for view in views:
                assert full[view] != opted_out[view], view
        finally:
            with_optout.close()
            removed.close()


def test_a_child_opted_out_by_a_parent_changes_no_view(region: Path, tmp_path: Path) -> None:
    store = OmopStore(region, PATHWAYS, reference_date=REF, threads=1)
    try:
        child = int(
            store.query(
                "SELECT person_id FROM asthma_children WHERE age < 13 ORDER BY person_id LIMIT 1"
            ).to_pylist()[0]["person_id"]
        )
    finally:
        store.close()
    reg = register(
        tmp_path / "parent.csv", [(child, "2025-06-01", "local", "opt_out", "parent", "")]
    )
    with_optout = OmopStore(
        region, PATHWAYS, reference_date=REF, threads=1, consent=ConsentPolicy(registers=(reg,))
    )
    removed = OmopStore(
        without(region, tmp_path / "without", child), PATHWAYS, reference_date=REF, threads=1
    )
    try:
        assert snapshot(with_optout) == snapshot(removed)
    finally:
        with_optout.close()
        removed.close()
