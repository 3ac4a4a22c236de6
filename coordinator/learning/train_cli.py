"""`chc learn train`: train a DP logistic model over the hub's Flower SuperLink (docs/training.md).

The analyst signs the model (solver "gradient"; each round a fit step charged at every
node) and the hub runs it over Flower; the command prints each round's noisy training loss,
the DP held-out AUC and the privacy each node spent, and saves the model with its provenance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.analyst import report
from coordinator.analyst.cli import _connect
from protocols.cli import AnalystIdentityOpt, HubOpt, JsonOpt
from protocols.cli import console as console_for_output
from queries.errors import ConfigError
from queries.model import DEFAULT_ROUNDS, MAX_HIDDEN, MAX_ROUNDS, Covariate, Family, ModelSpec


def train_command(
    pathway: Annotated[str, typer.Option(help="the pathway (view), e.g. copd")],
    outcome: Annotated[str, typer.Option(help="the yes/no outcome column, e.g. admitted")],
    adjust: Annotated[
        str, typer.Option(help="COLUMN[,COLUMN...]: the model's covariates")
    ] = "age_band,sex,imd_quintile",
    rounds: Annotated[
        int, typer.Option(help=f"gradient-descent rounds (1-{MAX_ROUNDS}), each a round trip")
    ] = DEFAULT_ROUNDS,
    rho: Annotated[
        float, typer.Option(help="zCDP budget of the whole training, at each node")
    ] = 1.0,
    model_kind: Annotated[
        str, typer.Option("--model", help="logistic, or mlp (one hidden layer of tanh units)")
    ] = "logistic",
    hidden: Annotated[int, typer.Option(help=f"mlp: hidden units (1-{MAX_HIDDEN})")] = 8,
    clip: Annotated[
        float, typer.Option(help="mlp: each person's gradient is clipped to this L2 norm")
    ] = 1.0,
    event: Annotated[
        str | None, typer.Option(help="the outcome level counted as 1 (default yes)")
    ] = None,
    where: Annotated[
        list[str] | None, typer.Option(help="COLUMN=V1,V2 on a public column (repeatable)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="save the model, its privacy cost and provenance (JSON)")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the whole run")] = 1800.0,
    hub: HubOpt = None,
    identity: AnalystIdentityOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a DP logistic model over Flower; each round is charged in every node's ledger."""
    from coordinator.learning.cli import parse_where  # cli.py registers this command

    columns = [c.strip() for c in adjust.split(",") if c.strip()]
    if not columns:
        raise ConfigError("--adjust: name at least one covariate")
    if model_kind not in ("logistic", "mlp"):
        raise ConfigError(f"--model {model_kind[:40]!r}: logistic or mlp")
    if out is not None and out.suffix.lower() != ".json":
        raise ConfigError(f"--out {out}: give a file ending in .json")
    model = ModelSpec(
        view=pathway,
        outcome=outcome,
        family=Family.BINOMIAL,
        covariates=tuple(Covariate(column=c) for c in columns),
        rho=rho,
        event=event,
        iterations=rounds,
        where=parse_where(where),
        solver="gradient",
        hidden=hidden if model_kind == "mlp" else 0,
        clip=clip,
    )
    with _connect(hub, identity) as fed:
        trained = fed.train(model, timeout_s=timeout)
    if as_json:
        console_for_output().print_json(report.to_json(trained.result))
    else:
        typer.echo(trained.summary())
    if out is not None:
        trained.save(out)
        if not as_json:
            typer.echo(f"model saved to {out}")
