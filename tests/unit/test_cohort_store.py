"""Ad hoc cohorts in a node's store (node.data.cohorts, node.data.cohort_cache).

Real DuckDB over the hand-written OMOP data of tests/unit/omop_testdata.py: a cohort built on
demand has exactly the rows of the pathway view of the same definition, its descendants come
from concept_ancestor when the source has one, a repeated cohort is not rebuilt, the cache
stays bounded, and a consent reload starts a fresh cache that never serves the old data.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.config import load_config
from node.data.cohorts import parse_cohorts
from node.data.consent import ConsentPolicy
from node.data.store import OmopStore
from node.data.view_set import cohort_runner
from queries.cohort import COHORT_VIEW, Allow, Cohort, CohortPolicy
from queries.errors import ConfigError, DataError, PermissionDeniedError
from queries.pathway import Pathway, load_pathways
from queries.spec import Query
from tests.unit.omop_testdata import ASTHMA, COPD, EPILEPSY, REF, Omop, example, write

ANY = CohortPolicy(Allow.ANY)
CHILD_ASTHMA = 4051466  # a descendant of ASTHMA in these tests' own concept_ancestor


def with_ancestors() -> Omop:
    omop = example()
    omop.person(12, (2012, 2, 2), location=100)
    omop.condition(12, CHILD_ASTHMA, REF.replace(year=2023))
    omop.rows("concept_ancestor").extend(
        [
            {"ancestor_concept_id": ASTHMA, "descendant_concept_id": ASTHMA},
            {"ancestor_concept_id": ASTHMA, "descendant_concept_id": CHILD_ASTHMA},
        ]
    )
    return omop


def open_store(source: Path, cohorts: CohortPolicy = ANY, **options: Any) -> OmopStore:
    options.setdefault("recheck_s", None)
    return OmopStore(
        source, load_pathways(None), reference_date=REF, threads=1, cohorts=cohorts, **options
    )


def cohort_of(p: Pathway) -> Cohort:
    return Cohort(p.conditions, p.descendants, p.entry, p.age_min, p.age_max, p.window_days)


def cohort_rows(store: OmopStore, cohort: Cohort, sql: str = "SELECT * FROM cohort") -> list[Any]:
    query = Query(view=COHORT_VIEW, rho=0.1, cohort=cohort)
    with store.snapshot() as views, cohort_runner(views, query) as runner:
        return sorted(tuple(r.values()) for r in runner.query(sql).to_pylist())


def members(store: OmopStore, cohort: Cohort) -> list[int]:
    return [r[0] for r in cohort_rows(store, cohort, "SELECT person_id FROM cohort")]


def builds(store: OmopStore) -> tuple[int, int]:
    """(cohorts built, cohorts kept) by the current views' cache."""
    with store.snapshot() as views:
        assert views.cohorts is not None
        return views.cohorts.builds, views.cohorts.cached()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OmopStore]:
    source = write(with_ancestors(), tmp_path_factory.mktemp("cohorts") / "omop")
    opened = open_store(source)
    yield opened
    opened.close()


@pytest.mark.parametrize("pathway", load_pathways(None), ids=lambda p: p.name)
def test_an_ad_hoc_cohort_is_the_pathway_view_of_its_definition(
    store: OmopStore, pathway: Pathway
) -> None:
    expected = sorted(
        tuple(r.values())
        for r in store.query(f'SELECT * FROM "{pathway.name}"').to_pylist()  # noqa: S608
    )
    assert expected  # every pathway has members in the example data
    assert cohort_rows(store, cohort_of(pathway)) == expected


def test_descendants_come_from_concept_ancestor_when_the_source_has_it(
    store: OmopStore, tmp_path: Path
) -> None:
    asthma = Cohort(conditions=(ASTHMA,), descendants=True)
    assert store.concept_ancestor
    assert members(store, asthma) == [1, 4, 12]
    assert members(store, Cohort(conditions=(ASTHMA,), descendants=False)) == [1, 4]
    without = open_store(write(example(), tmp_path / "omop"))
    try:
        assert not without.concept_ancestor
        assert members(without, asthma) == [1, 4]  # only the listed id matches
    finally:
        without.close()


def test_the_cohort_views_are_not_in_the_catalog_tables(store: OmopStore) -> None:
    members(store, Cohort(conditions=(COPD,)))
    assert COHORT_VIEW not in store.tables()
    assert not any(t.startswith("c_") for t in store.tables())


def test_a_repeated_cohort_is_not_rebuilt_and_the_cache_is_bounded(tmp_path: Path) -> None:
    from node.data.cohort_cache import MAX_CACHED

    store = open_store(write(example(), tmp_path / "omop"))
    try:
        copd = Cohort(conditions=(COPD,))
        first = members(store, copd)
        assert builds(store) == (1, 1)
        # The same definition, written differently (another order, explicit defaults).
        assert members(store, Cohort(conditions=(COPD,), descendants=True, age_max=120)) == first
        assert builds(store) == (1, 1)
        for age in range(1, MAX_CACHED + 1):
            members(store, Cohort(conditions=(COPD,), age_min=age))
        assert builds(store) == (MAX_CACHED + 1, MAX_CACHED)  # the least recent was dropped
        assert members(store, copd) == first  # ... so it is built again
        assert builds(store) == (MAX_CACHED + 2, MAX_CACHED)
    finally:
        store.close()


def test_a_consent_reload_starts_a_fresh_cache(tmp_path: Path) -> None:
    source = write(example(), tmp_path / "omop")
    register = tmp_path / "optouts.csv"
    register.write_text("person_id,date\n")
    store = open_store(source, consent=ConsentPolicy(registers=(register,)))
    try:
        epilepsy = Cohort(conditions=(EPILEPSY,))
        assert members(store, epilepsy) == [9, 10]
        assert builds(store) == (1, 1)
        tmp = register.with_name("optouts.tmp")
        tmp.write_text("person_id,date\n9,2024-01-01\n")
        tmp.replace(register)
        assert store.reload_if_changed()
        assert builds(store) == (0, 0)
        assert members(store, epilepsy) == [10]
        kept = store.query("SELECT DISTINCT person_id FROM cohort_src.condition").to_pylist()
        assert 9 not in {r["person_id"] for r in kept}  # nothing of an opted-out person stays
    finally:
        store.close()


def test_a_listed_policy_keeps_only_the_listed_concepts(tmp_path: Path) -> None:
    policy = CohortPolicy(Allow.LISTED, (ASTHMA,))
    store = open_store(write(with_ancestors(), tmp_path / "omop"), policy)
    try:
        assert members(store, Cohort(conditions=(ASTHMA,))) == [1, 4, 12]
        kept = store.query("SELECT DISTINCT condition_concept_id AS c FROM cohort_src.condition")
        assert sorted(r["c"] for r in kept.to_pylist()) == [ASTHMA, CHILD_ASTHMA]
    finally:
        store.close()
    policy.check(Cohort(conditions=(ASTHMA,)))
    with pytest.raises(PermissionDeniedError, match=r"concept id\(s\) 255573 are not listed"):
        policy.check(Cohort(conditions=(ASTHMA, COPD)))


def test_without_a_policy_the_node_keeps_nothing_for_cohorts(tmp_path: Path) -> None:
    store = open_store(write(example(), tmp_path / "omop"), CohortPolicy())
    try:
        schemas = store.query("SELECT schema_name FROM duckdb_schemas()").to_pylist()
        assert "cohort_src" not in {r["schema_name"] for r in schemas}
        with pytest.raises(DataError, match="keep nothing for ad hoc cohorts"):
            members(store, Cohort(conditions=(COPD,)))
    finally:
        store.close()
    with pytest.raises(PermissionDeniedError, match="does not answer ad hoc cohorts"):
        CohortPolicy().check(Cohort(conditions=(COPD,)))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("allow = 'some'", "cohorts.allow must be one of"),
        ("allow = 'listed'", "needs a non-empty cohorts.concepts"),
        ("allow = 'any'\nconcepts = [1]", 'only goes with cohorts.allow = "listed"'),
        ("allow = 'listed'\nconcepts = ['copd']", "must be a list of OMOP concept ids"),
        ("allow = 'any'\nconcept = [1]", r"unknown \[cohorts\] key\(s\) \['concept'\]"),
    ],
)
def test_bad_cohort_policies_are_refused(tmp_path: Path, table: str, message: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'name = "nwc"\nomop = "o"\nidentity = "i"\n\n[cohorts]\n{table}\n')
    with pytest.raises(ConfigError, match=message):
        load_config(config)


def test_the_policy_is_read_from_node_toml(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('name = "nwc"\nomop = "o"\nidentity = "i"\n')
    assert load_config(config).cohorts == CohortPolicy(Allow.NONE)
    config.write_text(config.read_text() + "[cohorts]\nallow = 'listed'\nconcepts = [5, 3, 5]\n")
    assert load_config(config).cohorts == CohortPolicy(Allow.LISTED, (3, 5))
    assert parse_cohorts({"allow": "any"}, "x") == ANY
