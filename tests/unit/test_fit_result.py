"""A fitted model on the wire and in the analyst's hands: serde, summary, tables, plots."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from coordinator.learning.cli import parse_covariates, parse_where
from coordinator.learning.result import FitResult
from protocols import serde_fit
from queries.errors import ConfigError, DataError, QueryError
from queries.fitted import FitIterationInfo, FittedCoefficient, FittedModel
from queries.model import Covariate, Family, StepRelease
from queries.results import BudgetStatus, NodeOutcome, NodeStatus
from tests.unit._cli_helpers import chc, error_line


def _fitted(family: Family = Family.BINOMIAL) -> FittedModel:
    return FittedModel(
        query_id="q1",
        family=family,
        link="logit",
        coefficients=(
            FittedCoefficient("(intercept)", -1.2, 0.01, 0.05, -1.298, -1.102),
            FittedCoefficient("sex[M]", 0.4, 0.02, 0.06, 0.2824, 0.5176),
        ),
        iterations=(FitIterationInfo(1, 12.0, False), FitIterationInfo(2, 0.01, True)),
        nodes=(
            NodeOutcome("north", NodeStatus.OK, rho_charged=0.5),
            NodeOutcome("south", NodeStatus.UNREACHABLE, message="gone"),
        ),
        partial=True,
        persons=1234,
        message="converged",
    )


def test_a_fitted_model_round_trips_on_the_wire() -> None:
    fitted = _fitted()
    assert serde_fit.fitted_from_proto(serde_fit.fitted_to_proto(fitted)) == fitted


def test_a_coefficient_without_an_interval_survives_the_wire_and_nan_does_not() -> None:
    import dataclasses

    fitted = _fitted()
    inf = math.inf
    unpinned = FittedCoefficient("age", 0.3, inf, inf, -inf, inf)  # the hub's "no interval"
    fitted = dataclasses.replace(fitted, coefficients=(*fitted.coefficients, unpinned))
    back = serde_fit.fitted_from_proto(serde_fit.fitted_to_proto(fitted))
    assert back == fitted
    assert FitResult.of(back).to_dict()["coefficients"][-1]["dp_std_error"] is None  # JSON null
    msg = serde_fit.fitted_to_proto(fitted)
    msg.coefficients[0].std_error = math.nan
    with pytest.raises(DataError, match="impossible standard error"):
        serde_fit.fitted_from_proto(msg)
    msg.coefficients[0].std_error = -1.0
    with pytest.raises(DataError, match="impossible standard error"):
        serde_fit.fitted_from_proto(msg)


def test_a_step_release_round_trips_and_impossible_noise_is_refused() -> None:
    release = StepRelease(
        node="north",
        step=2,
        columns=("(intercept)", "x"),
        vectors={"gradient": (1.5, -2.0), "hessian": (3.0, 1.0, 2.0)},
        variances={"gradient": 4.0, "hessian": 9.0},
        rho=0.25,
    )
    budget = BudgetStatus(rho_total=10, rho_spent=1, max_rho_per_query=5, delta=1e-6)
    msg = serde_fit.step_release_to_proto(
        release, query_id="n1", epsilon=1.0, budget=budget, ledger_sequence=7
    )
    assert serde_fit.step_release_from_proto(msg, "north") == release
    msg.statistics[0].noise_variance = -1.0
    with pytest.raises(DataError, match="impossible noise variance"):
        serde_fit.step_release_from_proto(msg, "north")
    msg.statistics[0].noise_variance = 1.0
    msg.statistics[1].values[0] = math.nan
    with pytest.raises(DataError, match="non-finite 'hessian'"):
        serde_fit.step_release_from_proto(msg, "north")


def test_the_summary_shows_both_errors_the_interval_and_the_odds_ratio() -> None:
    text = FitResult.of(_fitted()).summary()
    header = text.splitlines()[1]
    for word in ("coefficient", "estimate", "SE (DP)", "SE (total)", "95% CI", "odds ratio"):
        assert word in header
    row = next(line for line in text.splitlines() if line.startswith("sex[M]"))
    assert "0.4" in row
    assert "0.02" in row
    assert "0.06" in row
    assert f"{math.exp(0.4):.4g}" in row
    assert f"{math.exp(0.2824):.4g}" in row
    assert "north 0.5" in text
    assert "south unreachable" in text
    assert "(partial)" in text


def test_a_gaussian_summary_has_no_ratio_and_the_table_has_null_ratios() -> None:
    fitted = FitResult.of(_fitted(Family.GAUSSIAN))
    assert "ratio" not in fitted.summary().splitlines()[1]
    table = fitted.to_arrow()
    assert table.column("ratio").null_count == table.num_rows


def test_the_arrow_table_has_both_intervals() -> None:
    table = _fitted().to_arrow()
    row = table.to_pylist()[1]
    assert row["column"] == "sex[M]"
    assert row["dp_ci_low"] == pytest.approx(0.4 - 1.959963984540054 * 0.02)
    assert row["ratio_high"] == pytest.approx(math.exp(0.5176))
    frame = _fitted().to_pandas()
    assert list(frame["column"]) == ["(intercept)", "sex[M]"]


@pytest.mark.parametrize(("suffix", "magic"), [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_a_forest_plot_is_written_as_png_or_svg(tmp_path: Path, suffix: str, magic: bytes) -> None:
    path = FitResult.of(_fitted()).forest_plot(tmp_path / f"forest{suffix}")
    assert path.read_bytes().startswith(magic)
    if suffix == ".svg":
        assert "sex[M]" in path.read_text()


def test_a_forest_plot_refuses_other_formats(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.png or \.svg"):
        FitResult.of(_fitted()).forest_plot(tmp_path / "forest.pdf")


def test_covariates_take_a_reference_level_in_brackets() -> None:
    assert parse_covariates("sex, imd_quintile[3],age") == (
        Covariate("sex"),
        Covariate("imd_quintile", reference="3"),
        Covariate("age"),
    )
    with pytest.raises(ConfigError, match="COLUMN or COLUMN"):
        parse_covariates("sex[M")
    with pytest.raises(ConfigError, match="COLUMN=V1,V2"):
        parse_where(["sex"])


def test_the_cli_refuses_bad_flags_in_one_line_before_connecting() -> None:
    base = ["learn", "glm", "--pathway", "copd", "--outcome", "readmitted", "--rho", "1"]
    run = chc(*base, "--family", "binomial", "--plot", "out.pdf", "--hub", "127.0.0.1:1")
    assert ".png or .svg" in error_line(run)
    assert run.exit_code == 2
    run = chc(*base, "--family", "gaussian", "--iterations", "3", "--hub", "127.0.0.1:1")
    assert "one step" in error_line(run)
    assert run.exit_code == 3  # a QueryError: refused locally, as `chc query` does
    run = chc(*base, "--family", "logistic")
    assert run.exit_code == 2


def test_query_errors_stay_query_errors() -> None:
    with pytest.raises(QueryError):
        parse_covariates("1bad")
