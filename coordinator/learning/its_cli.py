"""`chc learn its`: interrupted time series (and DiD with --control) of a pathway's DP
monthly counts (docs/learning.md).

One DP query counts the rows of the pathway's admissions view (`<pathway>_admissions`) by
month at every node; the hub then fits the segmented regression (its.py) to the treated
series (one region, or all pooled) and, with --control, to the controls' summed series
(did.py). Registered in the `learn` group by coordinator/learning/cli.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import pyarrow as pa
import typer

from coordinator.analyst import report
from coordinator.analyst.cli import _connect, _deadline
from coordinator.learning import did, its
from coordinator.learning.its_plot import its_plot
from coordinator.learning.plot import figure_paths
from protocols.cli import AnalystIdentityOpt, CommandFailedError, ExitCode, HubOpt, JsonOpt
from protocols.cli import console as console_for_output
from queries.combine import POOLED
from queries.errors import ConfigError
from queries.results import NodeStatus
from queries.spec import Filter, Measure, Query, Statistic

if TYPE_CHECKING:
    from coordinator.analyst.client import Federation

OUTCOMES = {"admissions": "pathway-related emergency admissions (rows of <pathway>_admissions)"}
MEASURE = "admissions"
DEFAULT_PRE_MONTHS = 12


def its_query(pathway: str, months: tuple[str, ...], rho: float, cap: int | None) -> Query:
    """The one DP query: rows of the pathway's admissions view per month, in the span."""
    return Query(
        view=f"{pathway}_admissions",
        rho=rho,
        measures=(Measure(Statistic.COUNT_ROWS, name=MEASURE),),
        group_by=("month",),
        where=(Filter("month", months),),
        rows_per_person=cap,
    )


def series_from_table(table: pa.Table, region: str, months: tuple[str, ...]) -> its.Series:
    """A region's (or POOLED's) monthly counts and DP variances (std_error squared)."""
    rows = {
        r["month"]: r
        for r in table.to_pylist()
        if r["region"] == region and r["measure"] == MEASURE
    }
    missing = [m for m in months if rows.get(m, {}).get("estimate") is None]
    if len(missing) == len(months):
        raise CommandFailedError(ExitCode.NO_ANSWER, f"no monthly counts from {region}")
    if missing:
        raise CommandFailedError(
            ExitCode.REFUSED,
            f"{region} withheld {len(missing)} months (e.g. {missing[0]}) under its release "
            "rules; a series with gaps is not fitted: widen the months or raise rho",
        )
    counts = np.array([float(rows[m]["estimate"]) for m in months])
    variance = np.array([float(rows[m]["std_error"] or 0.0) ** 2 for m in months])
    return its.Series(region, months, counts, variance)


def _month(d: str, what: str) -> str:
    try:
        parsed = date.fromisoformat(d) if len(d) > 7 else date.fromisoformat(d + "-01")
    except ValueError:
        raise ConfigError(f"{what} {d[:20]!r}: give a date YYYY-MM-DD or a month YYYY-MM") from None
    return f"{parsed.year}-{parsed.month:02d}"


def _end_month(reference_dates: list[date]) -> str:
    """The last whole month every node's data covers."""
    ref = min(reference_dates)
    index = ref.year * 12 + ref.month - 1
    last_day = (date(ref.year + ref.month // 12, ref.month % 12 + 1, 1)).toordinal() - 1
    return its.month_name(index if ref.toordinal() == last_day else index - 1)


def _line(e: its.Estimate, digits: str = ".4g") -> str:
    return f"{e.estimate:{digits}} (95% CI {e.ci_low:{digits}} to {e.ci_high:{digits}})"


def _summary(title: str, f: its.ItsFit) -> list[str]:
    out = [
        f"{title}: {len(f.series.months)} months {f.series.months[0]}..{f.series.months[-1]}, "
        f"intervention {f.intervention}, seasonal term {'yes' if f.seasonal else 'no'}",
        f"  baseline level at {f.intervention}: {_line(f.level)} per month",
        f"  baseline trend: {_line(f.coefficient('trend'))} per month",
        f"  step (level change): {_line(f.step)} per month",
        f"  rate ratio at the step: {_line(f.rate_ratio, '.3f')}",
        f"  slope change: {_line(f.slope_change)} per month",
        f"  dispersion (Pearson chi2/df, ~1 if the variances fit): {f.dispersion:.2f}",
    ]
    if not math.isfinite(f.rate_ratio.ci_low):
        out.append("  (the baseline is too noisy for a bounded rate-ratio interval: raise rho)")
    return out


def its_cmd(
    pathway: Annotated[str, typer.Option(help="the pathway, e.g. asthma_children")],
    intervention: Annotated[str, typer.Option(help="first day (or month) of the change")],
    rho: Annotated[float, typer.Option(help="zCDP budget of the one query, at each node")],
    outcome: Annotated[str, typer.Option(help="what is counted per month")] = "admissions",
    region: Annotated[
        str | None, typer.Option(help="the region (node) that changed; default all pooled")
    ] = None,
    control: Annotated[
        str | None, typer.Option(help="REGION[,REGION...]: controls for difference-in-differences")
    ] = None,
    start: Annotated[
        str | None, typer.Option(help=f"first month (default {DEFAULT_PRE_MONTHS} before)")
    ] = None,
    end: Annotated[
        str | None, typer.Option(help="last month (default the nodes' last whole month)")
    ] = None,
    rows_per_person: Annotated[
        int | None, typer.Option(help="cap on admissions counted per person (less noise)")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="write the series and fitted segments: out.png, out.svg, or out (both)"),
    ] = None,
    hub: HubOpt = None,
    identity: AnalystIdentityOpt = None,
    deadline: Annotated[float, typer.Option(help="seconds to wait for nodes")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Interrupted time series of a pathway's monthly DP counts; DiD with --control."""
    if outcome not in OUTCOMES:
        raise ConfigError(
            f"--outcome {outcome[:40]!r}: an interrupted time series counts "
            + "; ".join(f"{k} ({v})" for k, v in OUTCOMES.items())
        )
    figures = figure_paths(plot) if plot is not None else ()
    controls = tuple(c.strip() for c in (control or "").split(",") if c.strip())
    check_arms(region, controls)
    t0 = _month(intervention, "--intervention")
    first = _month(start, "--start") if start else None
    last = _month(end, "--end") if end else None
    deadline = _deadline(deadline)
    console = console_for_output()
    with _connect(hub, identity) as fed:
        run = run_its(
            fed,
            pathway,
            t0,
            rho,
            region=region,
            controls=controls,
            start=first,
            end=last,
            rows_per_person=rows_per_person,
            deadline_s=deadline,
        )
    if as_json:
        console.print_json(report.to_json(run.out))
    else:
        typer.echo("\n".join(run.lines))
    for path in figures:
        its_plot(run.panels, path)
    if figures and not as_json:
        typer.echo("time-series plot written to " + " and ".join(str(p) for p in figures))


@dataclass(frozen=True)
class ItsRun:
    """An ITS (or DiD) run: the printed lines, the JSON dict, and the panels to plot."""

    lines: list[str]
    out: dict[str, Any]
    panels: list[tuple[str, its.ItsFit]]


def check_arms(region: str | None, controls: Sequence[str]) -> None:
    """Refuse controls without a treated region, or a treated region among the controls."""
    if controls and region is None:
        raise ConfigError("--control needs --region: the region that changed")
    if region is not None and region in controls:
        raise ConfigError(f"--control lists {region}, the treated --region; a control must not")


def run_its(
    fed: Federation,
    pathway: str,
    intervention: str,
    rho: float,
    *,
    region: str | None = None,
    controls: Sequence[str] = (),
    start: str | None = None,
    end: str | None = None,
    rows_per_person: int | None = None,
    deadline_s: float = 60.0,
) -> ItsRun:
    """The one monthly query and the ITS (DiD with controls) fits; months are YYYY-MM."""
    controls = tuple(controls)
    check_arms(region, controls)
    first = start or its.month_name(its.month_index(intervention) - DEFAULT_PRE_MONTHS)
    # Before any charge: the regions named must be nodes, and the span must be known.
    described, _ = fed.nodes(timeout_s=deadline_s)
    if not described:
        raise CommandFailedError(ExitCode.NO_ANSWER, "no node described its catalog")
    names = sorted(d.node for d in described)
    for r in (region, *controls):
        if r is not None and r not in names:
            raise ConfigError(f"region {r!r} is not a node of this federation: {names}")
    if end:
        last = end
    else:
        refs = [d.catalog.reference_date for d in described]
        last = _end_month([r for r in refs if r is not None] or [date.today()])
    months = its.month_range(first, last)
    query = its_query(pathway, months, rho, rows_per_person)
    result = fed.query(query, deadline_s=deadline_s)
    if not any(n.status is NodeStatus.OK for n in result.nodes):
        failure = report.nobody_answered(list(result.nodes))
        raise CommandFailedError(
            ExitCode.REFUSED if failure.refused else ExitCode.NO_ANSWER, failure.reason
        )
    treated = series_from_table(result.table, region or POOLED, months)
    out: dict[str, Any]
    panels: list[tuple[str, its.ItsFit]]
    if controls:
        control_series = series_from_table(result.table, controls[0], months)
        for c in controls[1:]:
            control_series = control_series + series_from_table(result.table, c, months)
        d = did.fit(treated, control_series, intervention)
        out = d.to_dict()
        panels = [(f"treated {region}", d.treated), (f"control {'+'.join(controls)}", d.control)]
        lines = _summary(f"treated {region}", d.treated)
        lines += _summary(f"control {'+'.join(controls)}", d.control)
        lines += [
            f"difference-in-differences rate ratio: {_line(d.ratio_of_ratios, '.3f')}",
            "parallel-trends check (pre-period slope, treated minus control, share of level "
            f"per month): {_line(d.pre_trend_difference, '.4f')}: "
            + ("consistent with parallel trends" if d.parallel else "NOT parallel: DiD suspect"),
        ]
    else:
        f = its.fit(treated, intervention)
        out = f.to_dict()
        panels = [(region or POOLED, f)]
        lines = _summary(region or POOLED, f)
    out["query"] = {"view": query.view, "rho": rho, "nodes": [n.node for n in result.nodes]}
    return ItsRun(lines, out, panels)
