"""Compiling queries against a catalog (queries.plan): refusals, domains, components, rho.

Planning touches no data; the SQL a plan builds is run on DuckDB in test_plan_sql.py.
"""

from __future__ import annotations

import itertools
import math

import pytest

from node.data.catalog import AGE_BANDS, SEXES, build_catalog
from queries import plan, plan_sql
from queries.errors import QueryError
from queries.pathway import builtin_pathways
from queries.schema import Catalog
from queries.sensitivity import Kind
from queries.spec import Filter, Measure, Query, Statistic
from tests.unit._plan_helpers import CUSTOM, MAX_COST, counts, q

BANDS = tuple(b for b, _, _ in AGE_BANDS)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return build_catalog(list(builtin_pathways().values()))


# ---- refusals --------------------------------------------------------------------------------


def test_unknown_view_suggests_close_names(catalog: Catalog) -> None:
    with pytest.raises(QueryError, match=r"unknown view 'person'.*did you mean 'persons'"):
        plan.compile_query(q("person"), catalog)
    with pytest.raises(QueryError, match="did you mean 'asthma_children'"):
        plan.compile_query(q("asthma_child"), catalog)


def test_unknown_view_far_from_any_lists_them_all(catalog: Catalog) -> None:
    with pytest.raises(QueryError, match=r"available: .*copd.*persons"):
        plan.compile_query(q("zzzzzzzz"), catalog)


def test_unknown_column_suggests_close_names(catalog: Catalog) -> None:
    with pytest.raises(QueryError, match=r"no column 'agebands'.*did you mean 'age_band'"):
        plan.compile_query(q(group_by=("agebands",)), catalog)
    with pytest.raises(QueryError, match=r"no column 'sexx'.*did you mean 'sex'"):
        plan.compile_query(q(where=(Filter("sexx", ("female",)),)), catalog)


@pytest.mark.parametrize("column", ["person_id", "cost", "weight"])
def test_grouping_by_a_column_without_a_public_domain_is_refused(column: str) -> None:
    with pytest.raises(QueryError, match=f"cannot group by '{column}'.*'sex'"):
        plan.compile_query(q("visits", group_by=(column,)), CUSTOM)


@pytest.mark.parametrize("column", ["person_id", "cost"])
def test_filtering_on_a_column_without_a_public_domain_is_refused(column: str) -> None:
    with pytest.raises(QueryError, match=f"cannot filter on '{column}'"):
        plan.compile_query(q("visits", where=(Filter(column, ("1",)),)), CUSTOM)


def test_filter_values_outside_the_domain_are_refused(catalog: Catalog) -> None:
    with pytest.raises(QueryError, match=r"\['Female'\], not in its public domain"):
        plan.compile_query(q(where=(Filter("sex", ("male", "Female")),)), catalog)
    # The asthma view only has children's age bands.
    with pytest.raises(QueryError, match="not in its public domain"):
        plan.compile_query(q("asthma_children", where=(Filter("age_band", ("18-39",)),)), catalog)


@pytest.mark.parametrize(
    "value",
    [
        "female' OR '1'='1",
        "female'; DROP TABLE persons; --",
        'female") OR (1=1',
        "' UNION SELECT person_id FROM persons --",
    ],
)
def test_sql_injection_in_filter_values_is_refused_before_sql(catalog: Catalog, value: str) -> None:
    with pytest.raises(QueryError, match="not in its public domain"):
        plan.compile_query(q(where=(Filter("sex", (value,)),)), catalog)


@pytest.mark.parametrize(
    "name", ['persons"; DROP TABLE persons; --', 'sex"', "sex' --", "persons/*", "a b"]
)
def test_identifiers_with_quotes_never_reach_the_planner(name: str) -> None:
    with pytest.raises(QueryError, match="not a valid name"):
        q(name)
    with pytest.raises(QueryError, match="not a valid name"):
        q(group_by=(name,))
    with pytest.raises(QueryError, match="not a valid name"):
        Filter(name, ("female",))
    with pytest.raises(QueryError, match="not a valid name"):
        Measure(Statistic.COUNT, name)
    with pytest.raises(QueryError, match="not a valid name"):
        Measure(Statistic.SUM, "total", column=name)


def test_too_many_cells_are_refused() -> None:
    with pytest.raises(QueryError, match=f"20200 values, more than the limit of {plan.MAX_CELLS}"):
        plan.compile_query(q("wide", group_by=("a", "b")), CUSTOM)


def test_the_cell_limit_counts_every_measure() -> None:
    at_limit = q(
        "wide", group_by=("a", "b"), where=(Filter("b", tuple(f"b{i}" for i in range(100))),)
    )
    assert plan.MAX_CELLS == 200 * 100
    assert plan.compile_query(at_limit, CUSTOM).cells == plan.MAX_CELLS
    two_measures = Query(
        view="wide",
        rho=0.1,
        measures=(Measure(Statistic.COUNT, "n1"), Measure(Statistic.COUNT_ROWS, "n2")),
        group_by=at_limit.group_by,
        where=at_limit.where,
    )
    with pytest.raises(QueryError, match="40000 values"):
        plan.compile_query(two_measures, CUSTOM)
    # Two measures that need the same vector share one release, so they fit.
    shared = Query(
        view="wide",
        rho=0.1,
        measures=counts("n1", "n2"),
        group_by=at_limit.group_by,
        where=at_limit.where,
    )
    assert plan.compile_query(shared, CUSTOM).cells == plan.MAX_CELLS


def test_the_cell_limit_is_checked_before_any_sql_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_sql(*_: object) -> str:
        raise AssertionError("SQL was built for a query over the cell limit")

    monkeypatch.setattr(plan_sql, "scan", no_sql)
    plan._compile.cache_clear()
    with pytest.raises(QueryError, match="more than the limit"):
        plan.compile_query(q("wide", group_by=("a", "b")), CUSTOM)
    plan._compile.cache_clear()


def test_filters_bring_a_large_query_under_the_limit() -> None:
    compiled = plan.compile_query(
        q("wide", group_by=("a", "b"), where=(Filter("a", ("a1", "a2")),)), CUSTOM
    )
    assert len(compiled.domain) == 2 * 101


def test_fractional_clamp_bounds_on_a_whole_number_column_are_refused() -> None:
    """SUM(CLAMP(los, 0, 0.4)) used to round each row to 0 and report 0 with an interval."""
    query = Query(
        view="visits",
        rho=0.1,
        measures=(Measure(Statistic.SUM, "s", column="los", clamp=(0, 0.4)),),
    )
    with pytest.raises(QueryError, match="whole-number column, so its CLAMP bounds"):
        plan.compile_query(query, CUSTOM)
    whole = Query(
        view="visits", rho=0.1, measures=(Measure(Statistic.SUM, "s", column="los", clamp=(0, 4)),)
    )
    assert plan.compile_query(whole, CUSTOM).components[0].upper == 4


# ---- domains and components ------------------------------------------------------------------


def test_domain_is_the_cross_product_in_declared_order(catalog: Catalog) -> None:
    compiled = plan.compile_query(q(group_by=("sex", "age_band")), catalog)
    assert compiled.domain == tuple(itertools.product(SEXES, BANDS))
    assert compiled.group_by == ("sex", "age_band")
    assert compiled.cells == len(SEXES) * len(BANDS)
    swapped = plan.compile_query(q(group_by=("age_band", "sex")), catalog)
    assert swapped.domain == tuple(itertools.product(BANDS, SEXES))


def test_pathway_views_have_their_own_age_bands(catalog: Catalog) -> None:
    compiled = plan.compile_query(q("asthma_children", group_by=("age_band",)), catalog)
    assert compiled.domain == (("0-4",), ("5-11",), ("12-17",))
    copd = plan.compile_query(q("copd", group_by=("age_band",)), catalog)
    assert copd.domain == (("18-39",), ("40-64",), ("65-79",), ("80+",))


def test_filters_restrict_the_domain_in_declared_order(catalog: Catalog) -> None:
    compiled = plan.compile_query(
        q(
            group_by=("sex", "age_band"),
            where=(Filter("age_band", ("80+", "0-4", "80+")), Filter("deceased", ("yes",))),
        ),
        catalog,
    )
    assert compiled.domain == tuple(itertools.product(SEXES, ("0-4", "80+")))


def test_no_group_by_releases_one_cell_per_measure(catalog: Catalog) -> None:
    compiled = plan.compile_query(q(), catalog)
    assert compiled.domain == ((),)
    assert compiled.cells == 1
    two = plan.compile_query(Query(view="persons", rho=0.1, measures=counts("a", "b")), catalog)
    # The same count asked twice is released once and paid for once.
    assert two.cells == 1
    assert [c.key for c in two.components] == ["persons"]
    assert [mp.key("n") for mp in two.measures] == ["persons", "persons"]


def test_compiling_keeps_the_query_and_view(catalog: Catalog) -> None:
    query = q("copd", group_by=("sex",))
    compiled = plan.compile_query(query, catalog)
    assert compiled.query == query
    assert compiled.view == catalog.view("copd")


def test_rho_is_shared_between_measures_by_weight() -> None:
    query = Query(
        view="visits",
        rho=0.3,
        measures=(
            Measure(Statistic.COUNT, "n", weight=2.0),
            Measure(Statistic.MEAN, "mean_cost", column="cost"),
        ),
    )
    shares = plan.compile_query(query, CUSTOM).rho_shares()
    assert shares["persons"] == pytest.approx(0.2)
    # The mean's 0.1 is split over its count and sum only (no sum of squares: it would only
    # feed a sampling term the census estimand does not have), in proportion to g_k D_k with
    # a mean guessed at the middle of [0, MAX_COST]: D_sum = 3 MAX_COST, g_n D_n = 3 MAX_COST/2.
    assert shares["sum:cost"] == pytest.approx(0.1 * 2 / 3)
    assert shares["rows:cost"] == pytest.approx(0.1 / 3)
    assert set(shares) == {"persons", "rows:cost", "sum:cost"}
    assert sum(shares.values()) == pytest.approx(0.3)


def test_a_shared_component_gets_what_each_of_its_measures_gives_it() -> None:
    query = Query(
        view="visits",
        rho=0.4,
        measures=(
            Measure(Statistic.QUANTILE, "median", column="los", quantile=0.5),
            Measure(Statistic.QUANTILE, "p90", column="los", quantile=0.9),
            Measure(Statistic.MEAN, "mean", column="los"),
            Measure(Statistic.VARIANCE, "var", column="los"),
        ),
    )
    compiled = plan.compile_query(query, CUSTOM)
    shares = compiled.rho_shares()
    # Both quantiles read one histogram, which receives both their shares.
    assert shares["bins:los"] == pytest.approx(0.2)
    assert [c.key for c in compiled.components].count("bins:los") == 1
    # The mean and the variance share the row count and the sum.
    assert compiled.users("sum:los") == ["mean", "var"]
    assert sum(shares.values()) == pytest.approx(0.4)
    text = compiled.describe()
    assert "bins:los" in text
    assert "median, p90" in text


def test_variance_spends_most_where_its_noise_comes_from() -> None:
    variance = Measure(Statistic.VARIANCE, "v", column="los")
    query = Query(view="visits", rho=1.0, measures=(variance,))
    shares = plan.compile_query(query, CUSTOM).rho_shares()
    # rho_k ~ g_k D_k: D_ss = 3 * 900, g_s D_s = 2 * 15 * 3 * 30, g_n D_n = 15^2 * 3.
    weights = {"sumsq:los": 2700.0, "sum:los": 2700.0, "rows:los": 675.0}
    total = sum(weights.values())
    for key, w in weights.items():
        assert shares[key] == pytest.approx(w / total)


def test_describe_mentions_every_component(catalog: Catalog) -> None:
    compiled = plan.compile_query(q(group_by=("sex",)), catalog)
    text = compiled.describe()
    assert "persons" in text
    assert "sex" in text
    assert "rho 0.1 (100%) for count" in text


@pytest.mark.parametrize("statistic", [Statistic.MEAN, Statistic.VARIANCE, Statistic.STDDEV])
def test_describe_works_for_derived_statistics(statistic: Statistic) -> None:
    # BUG: Plan.describe formats "clamped to [{c.lower:g}, {c.upper:g}]" whenever c.column is
    # set, but the rows component of a mean/variance/stddev has a column and no bounds, so
    # describe() (and hence Explain) raises TypeError. Test c.lower/c.upper, not c.column.
    query = Query(view="visits", rho=0.1, measures=(Measure(statistic, "m", column="los"),))
    text = plan.compile_query(query, CUSTOM).describe()
    assert "rows:los" in text
    assert "sum:los" in text


# ---- sensitivity -----------------------------------------------------------------------------


@pytest.mark.parametrize("group_by", [(), ("sex",), ("sex", "age_band", "deceased")])
def test_sensitivity_is_one_for_person_level_columns(
    catalog: Catalog, group_by: tuple[str, ...]
) -> None:
    (component,) = plan.compile_query(q(group_by=group_by), catalog).components
    assert component.kind is Kind.PERSONS
    assert component.sensitivity == 1.0


def test_person_counts_over_row_level_groups() -> None:
    assert plan.compile_query(q("visits", group_by=("sex",)), CUSTOM).components[0].sensitivity == 1
    by_setting = plan.compile_query(q("visits", group_by=("sex", "setting")), CUSTOM)
    assert by_setting.components[0].sensitivity == pytest.approx(math.sqrt(3))
    # A person touches at most as many groups as there are.
    one_setting = plan.compile_query(
        q("visits", group_by=("setting",), where=(Filter("setting", ("inpatient",)),)), CUSTOM
    )
    assert one_setting.components[0].sensitivity == 1.0


def test_each_measure_has_its_own_sensitivity() -> None:
    three = Query(
        view="visits",
        rho=0.1,
        group_by=("setting",),
        measures=(
            Measure(Statistic.COUNT, "m0"),
            Measure(Statistic.COUNT_ROWS, "m1"),
            Measure(Statistic.SUM, "m2", column="los"),
        ),
    )
    sensitivities = [c.sensitivity for c in plan.compile_query(three, CUSTOM).components]
    assert sensitivities == [pytest.approx(math.sqrt(3)), 3.0, 3.0 * 30]


def test_row_counts_and_sums_scale_with_rows_per_person() -> None:
    query = Query(
        view="visits",
        rho=0.1,
        measures=(
            Measure(Statistic.COUNT_ROWS, "rows"),
            Measure(Statistic.SUM, "cost", column="cost"),
            Measure(Statistic.HISTOGRAM, "los", column="los"),
        ),
    )
    rows, cost, los = plan.compile_query(query, CUSTOM).components
    assert rows.sensitivity == 3.0
    assert cost.exponent == 0
    assert cost.sensitivity == 3.0 * MAX_COST
    assert los.sensitivity == 3.0
    assert los.bins == 31  # one bin per whole value 0..30
