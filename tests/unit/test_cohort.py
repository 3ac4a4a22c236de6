"""Ad hoc cohorts in the query language (queries.cohort): the model, specs and SQL.

A cohort travels inside the signed query, so its canonical form, its spec form and its SQL
form must all say the same thing, a query without one must keep its canonical bytes, and
every bad definition must be refused with a message naming the field.
"""

from __future__ import annotations

import json

import pytest

from queries import spec_io
from queries.cohort import COHORT_VIEW, MAX_COHORT_CONCEPTS, Cohort, cohort_from_dict
from queries.errors import ConfigError, QueryError
from queries.pathway import Entry, Pathway, builtin_pathways
from queries.spec import Measure, Query, Statistic, canonical_bytes
from queries.sql import parse_sql
from queries.sql_print import to_sql
from queries.sql_rules import TABLE_ARGUMENTS

COPD_SQL = (
    "SELECT sex, COUNT(*) FROM cohort(conditions => [40481087], descendants => true, "
    "age_min => 18) GROUP BY sex"
)


def test_the_brief_example_parses_into_a_cohort_query() -> None:
    query = parse_sql(COPD_SQL, rho=0.05)
    assert query.view == COHORT_VIEW
    assert query.cohort == Cohort(conditions=(40481087,), descendants=True, age_min=18)
    assert query.group_by == ("sex",)
    assert query.rows_per_person is None


@pytest.mark.parametrize(
    "cohort",
    [
        Cohort(conditions=(40481087,)),
        Cohort(conditions=(3, 1, 2), descendants=False, age_min=40, age_max=79),
        Cohort(conditions=(255573,), entry=Entry.EMERGENCY_ADMISSION, window_days=30),
        Cohort(conditions=(), entry=Entry.EMERGENCY_VISIT, age_max=17),
    ],
)
def test_spec_json_yaml_and_sql_round_trips(cohort: Cohort) -> None:
    query = Query(
        view=COHORT_VIEW,
        rho=0.1,
        measures=(Measure(), Measure(Statistic.MEAN, "mean_age", column="age", clamp=(0, 120))),
        group_by=("sex",),
        cohort=cohort,
    )
    raw = canonical_bytes(query)
    assert spec_io.from_json(raw) == query
    assert spec_io.from_dict(query.to_dict()) == query
    assert spec_io.from_yaml(json.dumps(query.to_dict())) == query
    text = to_sql(query)
    assert text.count("FROM cohort(conditions => [")
    assert parse_sql(text, rho=0.1) == query


def test_a_query_without_a_cohort_keeps_its_canonical_bytes() -> None:
    """The field is emitted only when set: every existing signature stays valid."""
    query = Query(view="persons", rho=0.5, group_by=("sex",))
    assert canonical_bytes(query) == (
        b'{"group_by":["sex"],"measures":[{"name":"count","statistic":"count"}],"rho":0.5,'
        b'"version":"chc.query/1","view":"persons","where":[]}'
    )


def test_the_canonical_form_names_every_field_and_sorts_the_concepts() -> None:
    a = Query(view=COHORT_VIEW, rho=0.1, cohort=Cohort(conditions=(5, 2)))
    b = Query(view=COHORT_VIEW, rho=0.1, cohort=Cohort(conditions=(2, 5)))
    assert canonical_bytes(a) == canonical_bytes(b)
    assert a.cohort is not None
    assert a.cohort.key() == Cohort(conditions=(2, 5)).key()
    assert json.loads(canonical_bytes(a))["cohort"] == {
        "conditions": [2, 5],
        "descendants": True,
        "entry": "condition",
        "age_min": 0,
        "age_max": 120,
        "window_days": 365,
    }
    assert Cohort((2, 5)).key() != Cohort((2, 5), descendants=False).key()


def test_rows_per_person_is_a_table_argument_of_any_view() -> None:
    query = parse_sql("SELECT COUNT(*) FROM visits(rows_per_person => 3)", rho=0.1)
    assert (query.view, query.rows_per_person, query.cohort) == ("visits", 3, None)
    assert to_sql(query) == 'SELECT COUNT(*) AS "count" FROM "visits"(rows_per_person => 3)'
    assert parse_sql(to_sql(query), rho=0.1) == query
    both = parse_sql(
        "SELECT COUNT(*) FROM cohort(conditions := [1], rows_per_person => 1)", rho=0.1
    )
    assert both.rows_per_person == 1
    assert both.cohort == Cohort(conditions=(1,))
    assert parse_sql(to_sql(both), rho=0.1) == both


def test_every_table_argument_but_rows_per_person_belongs_to_the_cohort() -> None:
    assert set(TABLE_ARGUMENTS) == {"rows_per_person", *Cohort((1,)).to_dict()}


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT COUNT(*) FROM cohort", "ad hoc cohort: define it"),
        ("SELECT COUNT(*) FROM cohort()", "cohort has no 'conditions'"),
        ("SELECT COUNT(*) FROM cohort([1])", "table arguments are named"),
        ("SELECT COUNT(*) FROM visits(conditions => [1])", "write FROM cohort"),
        ("SELECT COUNT(*) FROM cohort(conditions => [1], conditions => [2])", "given twice"),
        ("SELECT COUNT(*) FROM cohort(conditions => [1.5])", "list of whole numbers"),
        ("SELECT COUNT(*) FROM cohort(conditions => 1)", "list of whole numbers"),
        ("SELECT COUNT(*) FROM cohort(conditions => [1], foo => 2)", "unknown table argument"),
        ("SELECT COUNT(*) FROM cohort(conditions => [0])", "positive integers"),
        ("SELECT COUNT(*) FROM cohort(conditions => [1, 1])", r"twice \(\[1\]\)"),
        ("SELECT COUNT(*) FROM cohort(conditions => [1], age_min => 30, age_max => 20)", "age_"),
        ("SELECT COUNT(*) FROM cohort(conditions => [1], window_days => 0)", "window_days"),
        ("SELECT COUNT(*) FROM cohort(conditions => [1], entry => condition)", "quoted string"),
        ("SELECT COUNT(*) FROM cohort(conditions => [1], entry => 'birth')", "cohort.entry"),
        ("SELECT COUNT(*) FROM cohort(conditions => [1], descendants => 1)", "true or false"),
        ("SELECT COUNT(*) FROM cohort(conditions => (SELECT 1))", "subqueries"),
        ("SELECT COUNT(*) FROM cohort(conditions => [1" + "0" * 30 + "])", "whole number"),
        ("SELECT COUNT(*) FROM visits(rows_per_person => 0)", "rows_per_person"),
        ("SELECT COUNT(*) FROM main.cohort(conditions => [1])", "no schemas"),
    ],
)
def test_bad_table_arguments_are_refused_with_the_reason(sql: str, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        parse_sql(sql, rho=0.1)


def test_too_many_concept_ids_are_refused_before_they_are_read() -> None:
    many = list(range(1, MAX_COHORT_CONCEPTS + 2))
    message = f"more than the limit of {MAX_COHORT_CONCEPTS}"
    with pytest.raises(QueryError, match=message):
        Cohort(conditions=tuple(many))
    with pytest.raises(QueryError, match=message):
        cohort_from_dict({"conditions": [*many[:-1], "not even a number"]})
    sql = f"SELECT COUNT(*) FROM cohort(conditions => [{', '.join(map(str, many))}])"  # noqa: S608
    with pytest.raises(QueryError, match=message):
        parse_sql(sql, rho=0.1)
    assert len(Cohort(conditions=tuple(many[:-1])).conditions) == MAX_COHORT_CONCEPTS


@pytest.mark.parametrize(
    ("cohort", "message"),
    [
        ("x", "field 'cohort' must be a mapping"),
        ({}, "no 'conditions'"),
        ({"conditions": 5}, "cohort.conditions must be a list"),
        ({"conditions": [True]}, "positive integers"),
        ({"conditions": ["5"]}, "positive integers"),
        ({"conditions": [2**63]}, "positive integers"),
        ({"conditions": [5], "age_min": "18"}, "cohort.age_min must be a whole number"),
        ({"conditions": [5], "descendants": "yes"}, "cohort.descendants must be true or false"),
        ({"conditions": [5], "concepts": [1]}, r"unknown field\(s\) \['concepts'\] in cohort"),
        ({"conditions": [], "entry": "condition"}, "lists no condition concept ids"),
    ],
)
def test_bad_cohort_specs_name_the_field(cohort: object, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        spec_io.from_dict({"view": "cohort", "rho": 0.1, "cohort": cohort})


def test_the_view_and_the_cohort_go_together() -> None:
    with pytest.raises(QueryError, match="queries view 'cohort', not 'persons'"):
        Query(view="persons", rho=0.1, cohort=Cohort(conditions=(1,)))
    with pytest.raises(QueryError, match="ad hoc cohort: define it"):
        spec_io.from_dict({"view": "cohort", "rho": 0.1})
    with pytest.raises(QueryError, match="must be a Cohort"):
        Query(view="cohort", rho=0.1, cohort={"conditions": [1]})  # type: ignore[arg-type]


def test_cohorts_and_pathways_share_their_rules() -> None:
    """The same definition is valid (or refused for the same reason) in both forms."""
    for pathway in builtin_pathways().values():
        cohort = Cohort(
            pathway.conditions,
            pathway.descendants,
            pathway.entry,
            pathway.age_min,
            pathway.age_max,
            pathway.window_days,
        )
        again = cohort.pathway(pathway.name, pathway.title)
        assert (again.conditions, again.age_min, again.age_max) == (
            tuple(sorted(pathway.conditions)),
            pathway.age_min,
            pathway.age_max,
        )
    with pytest.raises(QueryError, match="window_days must be between 1 and 3660"):
        Cohort(conditions=(1,), window_days=4000)
    with pytest.raises(ConfigError, match="window_days must be between 1 and 3660"):
        Pathway("p", "p", "", (1,), window_days=4000)


def test_no_pathway_may_take_the_cohort_view_name() -> None:
    with pytest.raises(ConfigError, match="taken by a built-in view"):
        Pathway(COHORT_VIEW, "t", "", (1,))
