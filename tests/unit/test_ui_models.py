"""The Models page's parts without a hub: forms to specs, fits and comparisons kept in
History as JSON and drawn again from it (coefficient table, forest and funnel plots), and
their exports. The fit and comparison are built by the real result types and the real
compare_units (the code `chc learn compare` runs after its fit), from figures given here."""

from __future__ import annotations

import io
import math
import re
import sqlite3
from pathlib import Path
from xml.etree import ElementTree

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from coordinator.learning import funnel
from coordinator.learning.compare import compare_units
from coordinator.learning.result import FitResult
from coordinator.ui import history as history_store
from coordinator.ui import models
from coordinator.ui.model_charts import forest_svg, funnel_svg
from queries.errors import ChcError, QueryError
from queries.fitted import Z95, FitIterationInfo, FittedCoefficient, NodeTotals
from queries.model import INTERCEPT, Covariate, Family, ModelSpec
from queries.results import NodeOutcome, NodeStatus
from queries.spec import Filter
from tests.unit._ui_helpers import browser, serving, ui_config

NODES = ("nenc", "nwc", "yh", "gm")
MODEL = ModelSpec(
    view="persons",
    outcome="deceased",
    family=Family.BINOMIAL,
    covariates=(Covariate("sex"), Covariate("age_band")),
    rho=0.5,
    where=(Filter("sex", ("female", "male")),),
)


def _coefficient(column: str, estimate: float, se: float) -> FittedCoefficient:
    return FittedCoefficient(column, estimate, se / 2, se, estimate - Z95 * se, estimate + Z95 * se)


def _fit(*, no_interval: str = "") -> FitResult:
    coefficients = [
        _coefficient(INTERCEPT, -3.5, 0.2),
        _coefficient("sex[male]", 0.4, 0.3),
        _coefficient("age_band[80+]", 2.1, 0.5),
    ]
    if no_interval:  # fit.py: a coefficient whose noise is not estimable has infinite SEs
        inf = math.inf
        coefficients.append(FittedCoefficient(no_interval, 0.7, inf, inf, -inf, inf))
    return FitResult(
        query_id="q-1",
        family=Family.BINOMIAL,
        link="logit",
        coefficients=tuple(coefficients),
        iterations=(FitIterationInfo(1, 0.5, False),),
        nodes=tuple(NodeOutcome(n, NodeStatus.OK, rho_charged=0.5) for n in NODES),
        partial=False,
        persons=5000,
        message="converged",
        model=MODEL,
    )


def _comparison_record() -> dict[str, object]:
    # nwc's observed count is far above its expected one: outside the 99.8% limits.
    observed = {"nenc": 44.0, "nwc": 120.0, "yh": 52.0, "gm": 27.0}
    expected = {"nenc": 48.0, "nwc": 60.0, "yh": 55.0, "gm": 30.0}
    totals = [
        NodeTotals(n, observed[n], 4.0, observed[n] - expected[n], 4.0, step=6) for n in NODES
    ]
    found = compare_units(totals, overdispersed=False, by="region", fit=_fit())
    return models.comparison_record(found)


def test_the_model_form_becomes_the_spec_the_cli_would_sign() -> None:
    form = {
        "view": ["persons"],
        "outcome": ["deceased"],
        "family": ["binomial"],
        "covariate": ["sex", "age_band", "sex"],
        "where": ["sex=female,male"],
        "rho": ["0.5"],
    }
    assert models.model_from_form(form) == MODEL
    with_region = models.model_from_form({**form, "region": ["1"], "where": [""]})
    assert with_region.region
    assert with_region.where == ()
    assert models.describe(MODEL) == (
        "binomial: deceased ~ sex + age_band on persons where sex=female,male"
    )


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("rho", "lots", "is not a number"),
        ("rho", "-1", "positive"),
        ("rho", "nan", "positive"),
        ("family", "logistic", "binomial, poisson, gaussian"),
        ("where", "sex", "COLUMN=LEVEL1,LEVEL2"),
        ("outcome", "sex", "cannot also be a covariate"),
    ],
)
def test_a_wrong_field_is_named_in_the_message(field: str, value: str, says: str) -> None:
    form = {
        "view": ["persons"],
        "outcome": ["deceased"],
        "family": ["binomial"],
        "covariate": ["sex"],
        "rho": ["0.5"],
        field: [value],
    }
    with pytest.raises(ChcError, match=re.escape(says)):
        models.model_from_form(form)


def test_the_comparison_form_builds_the_adjusting_model_of_chc_learn_compare() -> None:
    form = {
        "view": ["copd"],
        "outcome": ["admitted"],
        "family": ["binomial"],
        "by": ["region"],
        "adjust": ["sex", "age_band"],
        "rho": ["1"],
        "overdispersion": ["1"],
    }
    wanted = models.comparison_from_form(form)
    assert wanted.by == "region"
    assert wanted.overdispersion
    assert [c.column for c in wanted.model.covariates] == ["sex", "age_band"]
    assert not wanted.model.region
    assert wanted.model.compare_by is None
    by_site = models.comparison_from_form({**form, "by": ["care_site"], "adjust": ["region"]})
    assert by_site.model.compare_by == "care_site"
    assert by_site.model.region  # each trust against its region's expected rate
    with pytest.raises(ChcError, match="cannot also be adjusted"):
        models.comparison_from_form({**form, "adjust": ["region"]})
    with pytest.raises(QueryError, match="binomial, poisson"):
        models.comparison_from_form({**form, "family": ["gaussian"]})


def test_the_coefficient_table_has_a_row_per_term_with_ratios_and_both_errors() -> None:
    record = models.fit_record(_fit(no_interval="age_band[18-39]"))
    rows = models.coefficient_rows(record)
    assert [r["term"] for r in rows] == [
        INTERCEPT,
        "sex[male]",
        "age_band[80+]",
        "age_band[18-39]",
    ]
    male = rows[1]
    assert male["estimate"] == "0.4"
    assert male["dp_se"] == "0.15"
    assert male["se"] == "0.3"
    assert male["ratio"] == f"{math.exp(0.4):.4g}"
    low, high = math.exp(0.4 - Z95 * 0.3), math.exp(0.4 + Z95 * 0.3)
    assert male["ratio_ci"] == f"{low:.4g} to {high:.4g}"
    # An infinite SE is stored as null and shown as no interval, not as "inf".
    assert rows[3]["ci"] == "no interval"
    assert rows[3]["se"] == "no estimate"


def test_the_forest_plot_draws_each_term_but_the_intercept_on_a_ratio_axis() -> None:
    record = models.fit_record(_fit(no_interval="age_band[18-39]"))
    svg = forest_svg(record)
    root = ElementTree.fromstring(svg)  # noqa: S314 - markup this test made
    ns = {"s": "http://www.w3.org/2000/svg"}
    terms = root.findall(".//s:g[@class='term']", ns)
    assert [t.get("data-term") for t in terms] == ["sex[male]", "age_band[80+]", "age_band[18-39]"]
    # One interval line per term that has an interval; each term has a point and a title.
    assert [len(t.findall("s:line[@class='ci']", ns)) for t in terms] == [1, 1, 0]
    assert all(t.find("s:rect[@class='point']", ns) is not None for t in terms)
    titles = [t.findtext("s:title", namespaces=ns) or "" for t in terms]
    assert titles[0].startswith(f"sex[male]: odds ratio {math.exp(0.4):.3g} (95% CI ")
    assert "no interval" in titles[2]
    assert root.get("class") == "chc-forest"
    # The reference line is at ratio 1, among the ticks' labels.
    labels = [t.text for t in root.findall(".//s:text[@class='tick-label']", ns)]
    assert "1" in labels


def test_the_funnel_flags_and_names_the_outlier_with_the_limits_of_funnel_py() -> None:
    record = _comparison_record()
    rows = {r["unit"]: r for r in models.unit_rows(record)}
    assert set(rows) == set(NODES)
    assert rows["nwc"]["flag"] == models.OUTLIER
    assert rows["nenc"]["flag"] == models.NONE
    comparison = record["comparison"]
    assert isinstance(comparison, dict)
    assert comparison["outliers"] == ["nwc"]
    svg = funnel_svg(record)
    root = ElementTree.fromstring(svg)  # noqa: S314 - markup this test made
    ns = {"s": "http://www.w3.org/2000/svg"}
    assert root.get("id") == "funnel-plot"
    points = {g.get("data-unit"): g.get("data-flag") for g in root.findall(".//s:g", ns)}
    points.pop(None, None)
    assert points == {u: r["flag"] for u, r in rows.items()}
    levels = sorted({str(p.get("data-level")) for p in root.findall(".//s:polyline", ns)})
    assert levels == ["95", "99.8"]
    # The upper 99.8% limit at nwc's E lies below nwc's ratio (the flag and the plot agree).
    unit = next(u for u in comparison["units"] if u["unit"] == "nwc")
    high = funnel.limits(unit["expected"], 0.998, unit["residual_variance"], None)[1]
    assert unit["ratio"] > high


def test_fits_and_comparisons_are_kept_by_kind_and_export(tmp_path: Path) -> None:
    store = history_store.History(tmp_path / "history.sqlite")
    fit = models.fit_record(_fit(no_interval="age_band[18-39]"))
    model_id = store.add_record(
        history_store.KIND_MODEL,
        models.describe(MODEL),
        models.spec_json(MODEL),
        query_id="q-1",
        partial=False,
        record=fit,
    )
    compare_id = store.add_record(
        history_store.KIND_COMPARISON,
        "O/E by region",
        models.spec_json(MODEL),
        query_id="q-2",
        partial=True,
        record=_comparison_record(),
    )
    failed = store.add_error("a model", "{}", "every node refused", kind="model")
    assert [(e.id, e.kind, e.status) for e in store.entries()] == [
        (failed, "model", "error"),
        (compare_id, "comparison", "partial"),
        (model_id, "model", "ok"),
    ]
    entry = store.get(model_id)
    assert entry is not None
    assert entry.record == fit
    table = history_store.entry_table(entry)
    assert table is not None
    assert table.column("column").to_pylist() == [c["column"] for c in fit["fit"]["coefficients"]]
    assert pq.read_table(io.BytesIO(history_store.to_parquet(table))).equals(table)
    back = pa_csv.read_csv(io.BytesIO(history_store.to_csv(table)))
    assert back.column("estimate").to_pylist() == table.column("estimate").to_pylist()
    units = history_store.entry_table(store.get(compare_id))  # type: ignore[arg-type]
    assert units is not None
    assert sorted(units.column("unit").to_pylist()) == sorted(NODES)
    assert history_store.entry_table(store.get(failed)) is None  # type: ignore[arg-type]


def test_an_older_store_gains_the_kind_column_and_keeps_its_queries(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite"
    with sqlite3.connect(path) as con:  # the store as the first dashboard wrote it
        con.execute(
            "CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, created TEXT NOT NULL,"
            " sql TEXT NOT NULL, query_json TEXT NOT NULL, query_id TEXT NOT NULL, status TEXT"
            " NOT NULL, message TEXT NOT NULL, partial INTEGER NOT NULL, result_arrow BLOB,"
            " nodes_json TEXT NOT NULL)"
        )
        con.execute(
            "INSERT INTO entries (created, sql, query_json, query_id, status, message, partial,"
            " result_arrow, nodes_json) VALUES ('2026-01-01T00:00:00+00:00', 'SELECT 1', '{}',"
            " '', 'error', 'refused', 0, NULL, '[]')"
        )
    con.close()
    store = history_store.History(path)
    [old] = store.entries()
    assert (old.kind, old.sql, old.message) == ("query", "SELECT 1", "refused")
    new = store.add_record(
        "model", "m", "{}", query_id="q", partial=False, record=models.fit_record(_fit())
    )
    assert [e.kind for e in store.entries()] == ["model", "query"]
    assert store.get(new) is not None


def test_a_stored_fit_and_comparison_reopen_with_their_ids(tmp_path: Path) -> None:
    config = ui_config(tmp_path)
    fit_id = config.history.add_record(
        "model", "a fit", "{}", query_id="q", partial=False, record=models.fit_record(_fit())
    )
    compare_id = config.history.add_record(
        "comparison", "O/E", "{}", query_id="q", partial=False, record=_comparison_record()
    )
    with serving(config) as base, browser(base) as c:
        fit_page = c.get(f"/history/{fit_id}").text
        compare_page = c.get(f"/history/{compare_id}").text
        listed = c.get("/history").text
        csv = c.get(f"/history/{compare_id}.csv")
    assert '<table id="coefficients"' in fit_page
    assert fit_page.count("<tr data-term=") == 3
    assert fit_page.count('class="chc-forest"') == 1
    assert '<table id="comparison"' in compare_page
    assert compare_page.count("<tr data-unit=") == len(NODES)
    assert '<tr data-unit="nwc" data-flag="outlier"' in compare_page
    assert 'id="funnel-plot"' in compare_page
    assert '<li id="outliers"><strong>Outliers</strong> (outside 99.8%): nwc</li>' in compare_page
    # The adjusting fit is shown too, under ids of its own (one #coefficients a page).
    assert compare_page.count('id="coefficients"') == 0
    assert 'id="adjusting-coefficients"' in compare_page
    assert f'data-entry="{fit_id}" data-status="ok" data-kind="model"' in listed
    assert csv.status_code == 200
    assert csv.text.splitlines()[0].startswith('"unit","observed","expected","ratio"')


def test_the_models_page_without_a_hub_says_why(tmp_path: Path) -> None:
    with serving(ui_config(tmp_path)) as base, browser(base) as c:
        page = c.get("/models")
        refused = c.post(
            "/models",
            data={"form": "model", "view": "persons", "outcome": "x", "rho": "0.5"},
            headers={"origin": base},
        )
    assert page.status_code == 200
    assert 'href="/models" aria-current="page"' in page.text
    assert 'class="warning"' in page.text  # the catalog is unavailable, and it says so
    assert refused.status_code == 503
    assert '<div id="error" role="alert">' in refused.text
    assert "Traceback" not in refused.text
