"""`chc learn compare`: O/E by unit against the pooled model, and a funnel plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.analyst import report
from coordinator.analyst.cli import _connect, _deadline
from coordinator.learning.compare import DEFAULT_RHO, adjusting_model, compare
from coordinator.learning.plot import figure_paths
from protocols.cli import AnalystIdentityOpt, HubOpt, JsonOpt
from protocols.cli import console as console_for_output
from queries.model import Family


def compare_command(
    pathway: Annotated[str, typer.Option(help="the pathway (view), e.g. copd")],
    outcome: Annotated[str, typer.Option(help="the outcome column (an event or a count)")],
    rho: Annotated[
        float, typer.Option(help="zCDP budget of the adjusting fit, at each node")
    ] = DEFAULT_RHO,
    by: Annotated[
        str, typer.Option(help="the units compared: region, or care_site (the usual trust)")
    ] = "region",
    adjust: Annotated[
        str,
        typer.Option(
            help="COLUMN[,COLUMN...] the expected counts adjust for; with --by care_site, "
            "add region to compare each trust with its region's expected rate"
        ),
    ] = "age_band,sex,imd_quintile",
    family: Annotated[Family, typer.Option(help="binomial (events) or poisson")] = (
        Family.BINOMIAL
    ),
    event: Annotated[
        str | None, typer.Option(help="binomial: the outcome level counted (default yes)")
    ] = None,
    where: Annotated[
        list[str] | None, typer.Option(help="COLUMN=V1,V2 on a public column (repeatable)")
    ] = None,
    overdispersion: Annotated[
        bool, typer.Option("--overdispersion", help="widen the limits by the estimated phi")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(help="write the funnel plot: out.png, out.svg, or out (both)"),
    ] = None,
    hub: HubOpt = None,
    identity: AnalystIdentityOpt = None,
    deadline: Annotated[float, typer.Option(help="seconds to wait for nodes, per step")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Compare units by observed/expected against the pooled model, with a funnel plot."""
    columns = [c.strip() for c in adjust.split(",") if c.strip()]
    from coordinator.learning.cli import parse_where  # cli.py registers this command

    model = adjusting_model(
        pathway,
        outcome,
        columns,
        rho,
        by=by,
        family=family,
        event=event,
        where=parse_where(where),
    )
    figures = figure_paths(plot) if plot is not None else ()
    with _connect(hub, identity) as fed:
        result = compare(
            fed, model, by=by, overdispersion=overdispersion, deadline_s=_deadline(deadline)
        )
    if as_json:
        console_for_output().print_json(report.to_json(result.to_dict()))
    else:
        typer.echo(result.summary())
    if figures:
        written = [result.plot(p) for p in figures]
        if not as_json:
            typer.echo("funnel plot written to " + " and ".join(str(p) for p in written))
