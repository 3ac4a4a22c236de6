"""The synthetic regions' known model: the COPD pathway's `admitted`, as the node derives it
from the generated OMOP records, follows the logistic model of docs/synthetic-data.md.

Four regions are generated, the node's real views are built over them (OmopStore, DuckDB),
and statsmodels fits the model on the pathway view's rows (one per person). The fitted
coefficients must agree with the documented ones within their sampling error: a Wald test
whose false-failure rate is below one in a million.
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import statsmodels.api as sm
from numpy.typing import NDArray
from scipy import stats

from coordinator.local import synth
from coordinator.local.synth.known import _age_at, pooled_design
from node.data.catalog import cohort_view
from node.data.store import OmopStore
from queries.model import design_columns
from queries.pathway import load_pathways
from tests.unit._synth_helpers import REF, SEED

PERSONS = 200_000  # per region: about 4,500 persons on the COPD pathway in each
REGIONS = tuple(r.slug for r in synth.REGIONS)
# The Wald statistic of a correct model is asymptotically chi-squared with one degree of
# freedom per coefficient; above this quantile a true model fails one time in a million.
FALSE_FAILURE = 1e-6
TRUST_TERM = f"care_site[{synth.WORSE_TRUST}]"


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pa.Table]:
    """Each region's COPD pathway view, as a node built over the generated files serves it."""
    (pathway,) = load_pathways([synth.KNOWN_PATHWAY])
    out: dict[str, pa.Table] = {}
    for region in synth.REGIONS:
        folder = tmp_path_factory.mktemp(region.slug)
        synth.generate_region(
            region, PERSONS, folder, seed=synth.region_seed(SEED, region), reference_date=REF
        )
        store = OmopStore(
            folder,
            [pathway],
            reference_date=REF,
            imd_lookup=folder / synth.LOOKUP_FILE,
            recheck_s=None,
            # The worse trust's persons carry its term (docs/synthetic-data.md, "Care sites").
            care_sites=(synth.WORSE_TRUST,),
        )
        try:
            out[region.slug] = store.query(
                f"""
                SELECT CAST(age_band AS VARCHAR) AS age_band, age, CAST(sex AS VARCHAR) AS sex,
                       CAST(imd_quintile AS VARCHAR) AS imd_quintile,
                       CAST(deceased AS VARCHAR) AS deceased,
                       CAST(admitted AS VARCHAR) AS admitted, care_site
                FROM {synth.KNOWN_PATHWAY}
                """  # noqa: S608 - a constant
            )
        finally:
            store.close()
    return out


def _fit(
    rows: dict[str, pa.Table],
) -> tuple[tuple[str, ...], NDArray[np.float64], NDArray[np.float64]]:
    (pathway,) = load_pathways([synth.KNOWN_PATHWAY])
    columns, x, y = pooled_design(synth.known_model(), cohort_view(pathway), rows)
    # The trust term: an indicator of the worse trust (every synthetic person's care_site is
    # their home trust, person.care_site_id).
    worse = np.concatenate(
        [
            np.asarray(pc.equal(t["care_site"], synth.WORSE_TRUST), dtype=np.float64)
            for t in rows.values()
        ]
    )
    x = np.column_stack([x, worse])
    fit = sm.GLM(y, x, family=sm.families.Binomial()).fit()
    return (*columns, TRUST_TERM), np.asarray(fit.params), np.asarray(fit.cov_params())


def _wald(
    estimate: NDArray[np.float64], cov: NDArray[np.float64], truth: NDArray[np.float64]
) -> float:
    gap = estimate - truth
    return float(gap @ np.linalg.solve(cov, gap))


def test_the_known_model_names_the_pathway_views_columns() -> None:
    (pathway,) = load_pathways([synth.KNOWN_PATHWAY])
    view = cohort_view(pathway)
    assert pathway.window_days == synth.KNOWN_WINDOW_DAYS
    assert pathway.age_min == synth.KNOWN_AGE_MIN
    age = view.column("age")
    assert (age.lower, age.upper) == synth.KNOWN_AGE_BOUNDS
    assert view.column(synth.KNOWN_OUTCOME).domain == ("no", synth.KNOWN_EVENT)
    for under_40 in (True, False):
        model = synth.known_model(under_40=under_40)
        truth = synth.known_coefficients(REGIONS, under_40=under_40)
        assert design_columns(model, view, REGIONS) == tuple(truth)
    # Another hub order moves the first region's effect into the intercept.
    shifted = synth.known_coefficients(("nwc", "nenc", "yh", "gm"))
    assert shifted["(intercept)"] == pytest.approx(
        synth.KNOWN_COEFFICIENTS["(intercept)"] + synth.KNOWN_REGION_EFFECTS["nwc"]
    )
    assert shifted["region[nenc]"] == pytest.approx(-synth.KNOWN_REGION_EFFECTS["nwc"])


def test_age_at_counts_years_as_the_node_does() -> None:
    """The generator's age at death equals DuckDB's date_sub('year', birth, death), the
    node's age, including birthdays on 29 February and on other months' last days."""
    import duckdb

    rng = np.random.default_rng(7)
    birth = rng.integers(-20_000, 20_000, 100_000)
    month_ends = np.array(
        [date(2000, 2, 29), date(1999, 2, 28), date(2001, 1, 31)], "datetime64[D]"
    )
    birth[:3] = month_ends.astype(np.int64)
    day = birth + rng.integers(0, 40_000, birth.size)
    leap_days = np.array([date(2001, 2, 28), date(2004, 2, 28), date(2001, 2, 28)], "datetime64[D]")
    day[:3] = leap_days.astype(np.int64)
    con = duckdb.connect()
    con.register(
        "dates",
        pa.table(
            {
                "b": pa.array(birth.astype("datetime64[D]")),
                "d": pa.array(day.astype("datetime64[D]")),
            }
        ),
    )
    node = con.sql("SELECT date_sub('year', b, d) AS a FROM dates").fetchnumpy()["a"]
    assert np.array_equal(_age_at(birth, day), node)


def test_a_fit_on_the_nodes_views_recovers_the_known_coefficients(
    rows: dict[str, pa.Table],
) -> None:
    columns, estimate, cov = _fit(rows)
    truth = {**synth.known_coefficients(REGIONS), TRUST_TERM: synth.KNOWN_TRUST_EFFECT}
    assert columns == tuple(truth)
    expected = np.array([truth[c] for c in columns])
    threshold = float(stats.chi2.isf(FALSE_FAILURE, len(columns)))
    statistic = _wald(estimate, cov, expected)
    se = np.sqrt(np.diag(cov))
    report = {
        c: (round(e, 3), t, round(s, 3))
        for c, e, t, s in zip(columns, estimate, expected, se, strict=True)
    }
    assert statistic < threshold, report
    # The worse trust is worse: its term (0.47, standard error about 0.065) is below zero
    # once in about 1e13 fits. (Its absence alone is not rejected at the joint threshold.)
    assert estimate[columns.index(TRUST_TERM)] > 0, report
    # The test has power: a model without the end-of-life effect (deceased[yes] = 0), or
    # with the deprivation gradient halved, is rejected by the same threshold.
    for wrong in (
        {"deceased[yes]": 0.0},
        {f"imd_quintile[{q}]": truth[f"imd_quintile[{q}]"] / 2 for q in "2345"},
    ):
        alternative = np.array([wrong.get(c, truth[c]) for c in columns])
        assert _wald(estimate, cov, alternative) > threshold, wrong


def test_every_person_on_the_pathway_is_in_the_fit(rows: dict[str, pa.Table]) -> None:
    """The synthetic persons all have sex female or male: the model's filter drops nobody,
    and the pathway's persons span every level of the design."""
    for table in rows.values():
        assert set(table["sex"].to_pylist()) == {"female", "male"}
        assert set(table["imd_quintile"].to_pylist()) == {"1", "2", "3", "4", "5", "unknown"}
        assert set(table["age_band"].to_pylist()) == {"18-39", "40-64", "65-79", "80+"}
        assert set(table["deceased"].to_pylist()) == {"no", "yes"}


def test_without_the_trust_term_the_worse_trust_moves_into_its_region(
    rows: dict[str, pa.Table],
) -> None:
    """Documented in docs/synthetic-data.md: a fit of known_model alone (no trust term) reads
    the worse trust into region[nwc]; its estimate is printed by -s for the figure there."""
    (pathway,) = load_pathways([synth.KNOWN_PATHWAY])
    columns, x, y = pooled_design(synth.known_model(), cohort_view(pathway), rows)
    fit = sm.GLM(y, x, family=sm.families.Binomial()).fit()
    nwc = float(np.asarray(fit.params)[columns.index("region[nwc]")])
    se = float(np.sqrt(np.diag(np.asarray(fit.cov_params())))[columns.index("region[nwc]")])
    share = float(np.mean(np.asarray(pc.equal(rows["nwc"]["care_site"], synth.WORSE_TRUST))))
    print(f"region[nwc] without the trust term: {nwc:.3f} (se {se:.3f}); RXL share {share:.3f}")
    # About a tenth of the region (10 trusts) has the worse trust as home trust.
    assert 0.07 < share < 0.13
