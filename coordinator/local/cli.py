"""`chc demo` and `chc synth`: a whole federation on this machine, and its synthetic data.

The top-level app (coordinator/cli.py) registers these commands. They are separate from the
analyst's and the hub operator's because they run everything locally (nodes, hub and
synthetic regions) rather than talk to a federation someone else runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.local import synth
from coordinator.local.demo import DEMO_FIGURES, run_demo
from coordinator.local.demo_learning import LEARNING_PERSONS
from protocols.cli import console as rich_console
from queries.errors import ConfigError

DEMO_PERSONS = 100_000


def demo(
    persons: Annotated[
        int | None,
        typer.Option(
            help=f"synthetic persons across all regions (default {DEMO_PERSONS:,}; "
            f"{LEARNING_PERSONS:,} with --learning)",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the synthetic data")] = 2015,
    rho: Annotated[float, typer.Option(help="zCDP budget per query at each node")] = 0.05,
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
    keep_running: Annotated[
        bool, typer.Option("--keep-running", help="leave the federation up until Ctrl-C")
    ] = False,
    workdir: Annotated[
        Path | None, typer.Option(help="keep data, PKI and logs here (default: a temp folder)")
    ] = None,
    node: Annotated[
        list[str] | None,
        typer.Option(
            "--node",
            help="NAME=PATH: run a node on your own OMOP data (a DuckDB file, a Parquet/CSV "
            "folder, or a node.toml from `chc-node init`) instead of synthetic regions; repeat",
        ),
    ] = None,
    learning: Annotated[
        bool,
        typer.Option(
            "--learning",
            help="then compare the care sites (funnel plot) and run an interrupted time "
            "series with difference-in-differences (synthetic regions only)",
        ),
    ] = False,
    figures: Annotated[
        Path, typer.Option(help="folder for the --learning figures (PNG and SVG)")
    ] = DEMO_FIGURES,
) -> None:
    """Four synthetic regions, four nodes and the hub on loopback with mTLS, and a report."""
    if persons is None:
        persons = LEARNING_PERSONS if learning else DEMO_PERSONS
    if persons < 4:
        raise ConfigError("--persons must be at least 4 (one per region)")
    raise typer.Exit(
        run_demo(
            persons=persons,
            seed=seed,
            rho=rho,
            as_json=as_json,
            keep_running=keep_running,
            workdir=workdir,
            nodes=tuple(node or ()),
            learning=learning,
            figures=figures,
        )
    )


def synth_cmd(
    region: Annotated[str, typer.Option(help="nenc, nwc, yh or gm")],
    persons: Annotated[int, typer.Option(help="number of persons")],
    out: Annotated[Path, typer.Option(help="folder for the OMOP Parquet files")],
    seed: Annotated[int, typer.Option(help="random seed")] = 2015,
) -> None:
    """Write synthetic OMOP CDM Parquet files for one region."""
    if persons < 1:
        raise ConfigError(f"--persons must be at least 1, got {persons}")
    try:
        chosen = synth.region_by_slug(region)
    except ValueError as exc:  # synth's own check, a plain ValueError
        raise ConfigError(f"--region: {exc}") from None
    counts = synth.generate_region(chosen, persons, out, seed=seed)
    rich_console(stderr=True).print(
        "wrote " + ", ".join(f"{k}: {v:,}" for k, v in counts.items()) + f" to {out}"
    )
