"""Disclosure rules: small counts suppressed, derived figures with them, counts rounded."""

from __future__ import annotations

import pyarrow as pa
import pytest

from queries import release
from queries.combine import OUTPUT_SCHEMA_TAIL, POOLED
from queries.errors import ConfigError
from queries.results import ReleaseRules

SCHEMA = pa.schema([("region", pa.string()), ("sex", pa.string()), *OUTPUT_SCHEMA_TAIL])


def _row(
    region: str, sex: str, measure: str, stat: str, est: float | None, **kw: object
) -> dict[str, object]:
    row: dict[str, object] = {
        "region": region,
        "sex": sex,
        "measure": measure,
        "statistic": stat,
        "bin_lower": None,
        "bin_upper": None,
        "estimate": est,
        "std_error": 3.0,
        "ci_low": None if est is None else est - 6,
        "ci_high": None if est is None else est + 6,
        "n": None,
        "approximate": False,
        "partial": False,
        "suppressed": False,
    }
    row.update(kw)
    return row


def _apply(
    rows: list[dict[str, object]], rules: ReleaseRules | None = None
) -> list[dict[str, object]]:
    rules = rules or ReleaseRules()
    table = release.apply(pa.Table.from_pylist(rows, schema=SCHEMA), rules, ("sex",))
    out: list[dict[str, object]] = table.to_pylist()
    return out


def test_counts_below_eight_are_suppressed_and_others_rounded_to_five() -> None:
    out = _apply(
        [
            _row("a", "f", "n", "count", 7.0),
            _row("a", "m", "n", "count", 8.0),
            _row("b", "f", "n", "count", 123.0),
        ]
    )
    assert out[0]["suppressed"]
    assert out[0]["estimate"] is None
    assert out[0]["ci_low"] is None
    assert out[1]["estimate"] == 10.0
    assert out[2]["estimate"] == 125.0
    # Interval bounds are rounded outwards so rounding never shrinks an interval.
    assert out[2]["ci_low"] == 115.0
    assert out[2]["ci_high"] == 130.0


def test_figures_derived_from_a_suppressed_cell_are_suppressed() -> None:
    out = _apply(
        [
            _row("a", "f", "n", "count", 3.0),
            _row("a", "f", "mean_los", "mean", 4.2, n=40.0, approximate=True),
            _row("a", "m", "n", "count", 50.0),
            _row("a", "m", "mean_los", "mean", 4.2, n=50.0),
            _row("b", "f", "median_los", "quantile", 3.0, n=6.0),
        ]
    )
    by = {(r["region"], r["sex"], r["measure"]): r for r in out}
    assert by[("a", "f", "mean_los")]["suppressed"]  # its cell has a suppressed count
    assert not by[("a", "m", "mean_los")]["suppressed"]
    assert by[("a", "m", "mean_los")]["estimate"] == 4.2  # means are not rounded
    assert by[("b", "f", "median_los")]["suppressed"]  # its own n is too small


def test_negative_noisy_counts_are_suppressed() -> None:
    out = _apply([_row("a", "f", "n", "count", -2.0)])
    assert out[0]["suppressed"]


def test_histogram_bins_are_suppressed_one_by_one() -> None:
    out = _apply(
        [
            _row("a", "f", "h", "histogram", 3.0, bin_lower=0.0, bin_upper=1.0),
            _row("a", "f", "h", "histogram", 40.0, bin_lower=1.0, bin_upper=2.0),
        ]
    )
    assert [r["suppressed"] for r in out] == [True, False]
    assert out[1]["estimate"] == 40.0


def test_rules_can_be_relaxed_or_tightened() -> None:
    none = _apply([_row("a", "f", "n", "count", 3.0)], ReleaseRules(0, 1))
    assert none[0]["estimate"] == 3.0
    strict = ReleaseRules(8, 5).strictest(ReleaseRules(10, 10))
    assert strict == ReleaseRules(10, 10)
    with pytest.raises(ConfigError):
        ReleaseRules(round_to=0)


def _published(out: list[dict[str, object]], measure: str, skip: str) -> list[float]:
    """The published estimates of one measure in the regions other than `skip`."""
    return [
        float(str(r["estimate"]))
        for r in out
        if r["measure"] == measure and r["region"] not in (POOLED, skip) and not r["suppressed"]
    ]


def test_a_suppressed_count_is_not_recovered_as_pooled_minus_the_other_regions() -> None:
    counts = {"a": 3.0, "b": 40.0, "c": 52.0, "d": 61.0}
    rows = [_row(region, "f", "n", "count", v) for region, v in counts.items()]
    rows.append(_row(POOLED, "f", "n", "count", sum(counts.values())))
    # Without rounding, as a hub with round_to = 1 publishes: the subtraction would be exact.
    out = _apply(rows, ReleaseRules(suppress_below=8, round_to=1))
    by = {r["region"]: r for r in out}
    assert by["a"]["suppressed"]
    pooled = float(str(by[POOLED]["estimate"]))
    assert pooled - sum(_published(out, "n", "a")) != counts["a"]
    # The smallest other region is suppressed with it; only their total (43) is derivable.
    assert by["b"]["suppressed"]
    assert pooled - sum(_published(out, "n", "a")) == counts["a"] + counts["b"]


def test_a_suppressed_sum_is_not_recovered_under_the_default_rules() -> None:
    # Sums are not rounded, so even the default rules would let pooled minus others recover it.
    sums = {"a": 17.0, "b": 410.0, "c": 523.0}
    counts = {"a": 2.0, "b": 40.0, "c": 52.0}
    rows = [_row(region, "f", "n", "count", v) for region, v in counts.items()]
    rows += [_row(region, "f", "days", "sum", v) for region, v in sums.items()]
    rows.append(_row(POOLED, "f", "n", "count", sum(counts.values())))
    rows.append(_row(POOLED, "f", "days", "sum", sum(sums.values())))
    out = _apply(rows)
    pooled = next(r for r in out if r["region"] == POOLED and r["measure"] == "days")
    assert not pooled["suppressed"]
    derived = float(str(pooled["estimate"])) - sum(_published(out, "days", "a"))
    assert derived != sums["a"]
    assert derived == sums["a"] + sums["b"]
