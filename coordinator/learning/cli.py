"""`chc learn glm`: fit a DP federated GLM from the command line (docs/models.md).

The top-level app (coordinator/cli.py) registers `learn_app`. The command builds a
ModelSpec from its flags, signs it for the hub (to fit, or to explain with --explain) and
prints the coefficient table, or JSON, and on request writes a forest plot.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from coordinator.analyst import report
from coordinator.analyst.cli import _connect, _deadline
from coordinator.learning.result import FitResult
from protocols.cli import (
    AnalystIdentityOpt,
    ChcGroup,
    CommandFailedError,
    ExitCode,
    HubOpt,
    JsonOpt,
)
from protocols.cli import console as console_for_output
from queries.errors import ConfigError
from queries.model import MAX_ITERATIONS, Covariate, Family, ModelSpec
from queries.results import NodeExplain, NodeStatus
from queries.spec import Filter

learn_app = typer.Typer(
    help="Fit models across every node, as if the data were pooled (docs/models.md).",
    no_args_is_help=True,
    cls=ChcGroup,
    pretty_exceptions_show_locals=False,
)

# "sex" or "sex[F]": a covariate, optionally with its reference level.
_COVARIATE = re.compile(r"(?P<column>[^\[\]]+?)\s*(?:\[(?P<reference>[^\[\]]+)\])?")


def parse_covariates(text: str) -> tuple[Covariate, ...]:
    """--covariates a,b[ref],c: the covariates, a category's reference level in brackets."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _COVARIATE.fullmatch(part)
        if m is None:
            raise ConfigError(
                f"--covariates: {part[:40]!r} must be COLUMN or COLUMN[REFERENCE_LEVEL]"
            )
        out.append(Covariate(column=m["column"].strip(), reference=m["reference"]))
    return tuple(out)


def parse_where(where: list[str] | None) -> tuple[Filter, ...]:
    """--where COLUMN=V1,V2 (repeatable): the rows the model is fitted on."""
    filters = []
    for w in where or []:
        column, sep, values = w.partition("=")
        if not sep or not values:
            raise ConfigError(f"--where {w[:60]!r} must look like COLUMN=V1,V2")
        filters.append(Filter(column=column.strip(), values=tuple(values.split(","))))
    return tuple(filters)


def print_fit_explain(explains: Sequence[NodeExplain], model: ModelSpec) -> None:
    """Each node's plan and price for the fit (nothing is spent)."""
    console = console_for_output()
    console.print(
        f"[bold]Plan for[/] a {model.family.value} model on {model.view}: rho {model.rho:g} "
        f"per node over {model.steps} steps (nothing spent)"
    )
    for e in explains:
        if e.status is not NodeStatus.OK:
            console.print(f"[red]{e.node}: {e.status.value}[/] {e.message}")
            continue
        remaining = f"{e.budget.rho_remaining:.4g}" if e.budget else "?"
        console.print(
            f"\n[bold]{e.node}[/]: rho {e.rho:.4g} (epsilon {e.epsilon:.3g}), "
            f"budget remaining {remaining}"
        )
        console.print(e.plan, markup=False)
        for m in e.measures:
            console.print(
                f"  {m.measure} ({m.statistic}): rho {m.rho:.4g}, noise sd {m.noise.scale:.4g}, "
                f"sensitivity {m.noise.sensitivity:.4g}",
                markup=False,
            )


def _failure(result: FitResult) -> None:
    if not result.coefficients:
        failure = report.nobody_answered(result.nodes)
        raise CommandFailedError(
            ExitCode.REFUSED if failure.refused else ExitCode.NO_ANSWER, failure.reason
        )


@learn_app.command("glm")
def glm(
    pathway: Annotated[str, typer.Option(help="the pathway (view) to fit on, e.g. copd")],
    outcome: Annotated[str, typer.Option(help="the outcome column")],
    family: Annotated[Family, typer.Option(help="the outcome's family (canonical link)")],
    rho: Annotated[float, typer.Option(help="zCDP budget of the whole fit, at each node")],
    covariates: Annotated[
        str, typer.Option(help="COLUMN[,COLUMN...]; a category's reference level as COL[LEVEL]")
    ] = "",
    region: Annotated[bool, typer.Option("--region", help="add a region (node) effect")] = False,
    where: Annotated[
        list[str] | None, typer.Option(help="COLUMN=V1,V2 on a public column (repeatable)")
    ] = None,
    event: Annotated[
        str | None, typer.Option(help="binomial: the outcome level counted as 1 (default yes)")
    ] = None,
    offset: Annotated[
        str | None, typer.Option(help="a positive numeric column whose log is the offset")
    ] = None,
    iterations: Annotated[
        int | None,
        typer.Option(help=f"Newton steps after the design check (1 to {MAX_ITERATIONS})"),
    ] = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="show each node's plan and cost; spend nothing")
    ] = False,
    plot: Annotated[
        Path | None, typer.Option(help="write a forest plot of the ratios: out.png or out.svg")
    ] = None,
    hub: HubOpt = None,
    identity: AnalystIdentityOpt = None,
    deadline: Annotated[float, typer.Option(help="seconds to wait for nodes, per step")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Fit a GLM across every node (design check, then Newton steps); print its coefficients."""
    model = ModelSpec(
        view=pathway,
        outcome=outcome,
        family=family,
        covariates=parse_covariates(covariates),
        rho=rho,
        region=region,
        offset=offset,
        event=event,
        iterations=iterations,
        where=parse_where(where),
    )
    if plot is not None and plot.suffix.lower() not in (".png", ".svg"):
        raise ConfigError(f"--plot {plot}: give a file ending in .png or .svg")
    deadline = _deadline(deadline)
    console = console_for_output()
    with _connect(hub, identity) as fed:
        if explain:
            explains = fed.explain(model, deadline_s=deadline)
            if as_json:
                console.print_json(report.to_json([report.explain_to_dict(e) for e in explains]))
            else:
                print_fit_explain(explains, model)
            failure = report.explain_failure(explains)
            if failure is not None:
                code = ExitCode.REFUSED if failure.refused else ExitCode.NO_ANSWER
                raise CommandFailedError(code, failure.reason)
            return
        result = fed.fit(model, deadline_s=deadline)
    if as_json:
        console.print_json(report.to_json(result.to_dict()))
    else:
        typer.echo(result.summary())
    _failure(result)
    if plot is not None:
        result.forest_plot(plot)
        if not as_json:
            typer.echo(f"forest plot written to {plot}")


# `chc learn compare` lives in its own module (O/E and funnel plots, docs/models.md).
from coordinator.learning.compare_cli import compare_command  # noqa: E402

learn_app.command("compare")(compare_command)

# `chc learn its` (interrupted time series, DiD with --control) likewise (docs/learning.md).
from coordinator.learning.its_cli import its_cmd  # noqa: E402

learn_app.command("its")(its_cmd)

from coordinator.learning.train_cli import train_command  # noqa: E402

learn_app.command("train")(train_command)
