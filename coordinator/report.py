"""Rendering federated results for people (rich tables) and programs (JSON, CSV)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from queries.results import FederatedResult, NodeStatus
from queries.spec import Query


def result_to_dict(result: FederatedResult, query: Query, *, title: str = "") -> dict[str, Any]:
    """A JSON-ready summary: rows with estimate and interval, and every node's status."""
    rows = []
    for r in result.table.to_pylist():
        rows.append(
            {
                "region": r["region"],
                "groups": {c: r[c] for c in query.group_by},
                "measure": r["measure"],
                "estimate": r["estimate"],
                "std_error": r["std_error"],
                "ci_low": r["ci_low"],
                "ci_high": r["ci_high"],
            }
        )
    return {
        "title": title,
        "query_id": result.query_id,
        "query": query.to_dict(),
        "partial": result.partial,
        "rows": rows,
        "nodes": [
            {
                "node": o.node,
                "status": o.status.value,
                "message": o.message,
                "rho_spent": o.rho_charged,
                "rho_spent_total": o.budget.rho_spent if o.budget else None,
                "rho_remaining": o.budget.rho_remaining if o.budget else None,
                "noise_std": o.noise_variance**0.5,
                "latency_ms": round(o.latency_ms, 2),
            }
            for o in result.nodes
        ],
    }


def to_json(payload: object) -> str:
    """Stable, readable JSON."""
    return json.dumps(payload, indent=2, sort_keys=False)


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def print_result(
    console: Console,
    result: FederatedResult,
    query: Query,
    *,
    title: str = "",
    labels: Mapping[str, str] | None = None,
) -> None:
    """A table of per-region and pooled estimates with 95% intervals, then node statuses."""
    table = Table(title=title or None, title_justify="left", show_lines=False)
    table.add_column("Region")
    for c in query.group_by:
        table.add_column(c.replace("_", " ").capitalize())
    if len(query.measures) > 1:
        table.add_column("Measure")
    table.add_column("Estimate", justify="right")
    table.add_column("95% interval", justify="right")
    last_region = None
    for r in result.table.to_pylist():
        if last_region is not None and r["region"] != last_region:
            table.add_section()
        last_region = r["region"]
        region = (labels or {}).get(r["region"], r["region"])
        cells = [region, *(str(r[c]) for c in query.group_by)]
        if len(query.measures) > 1:
            cells.append(r["measure"])
        cells += [_fmt(r["estimate"]), f"{_fmt(r['ci_low'])} to {_fmt(r['ci_high'])}"]
        style = "bold" if r["region"] == "All regions" else None
        table.add_row(*cells, style=style)
    console.print(table)
    if result.partial:
        console.print(
            "[bold yellow]Partial result:[/] the pooled rows cover only the nodes marked ok."
        )
    print_nodes(console, result)


def print_nodes(console: Console, result: FederatedResult) -> None:
    """Each node's status and the privacy budget it spent."""
    table = Table(title="Nodes", title_justify="left")
    for col in ("Node", "Status", "rho spent", "rho used / total", "Noise sd", "ms", "Note"):
        table.add_column(col, justify="right" if col in {"rho spent", "Noise sd", "ms"} else "left")
    for o in result.nodes:
        colour = "green" if o.status is NodeStatus.OK else "red"
        used = f"{o.budget.rho_spent:.4g} / {o.budget.rho_total:.4g}" if o.budget else "-"
        table.add_row(
            o.node,
            f"[{colour}]{o.status.value}[/]",
            f"{o.rho_charged:.4g}",
            used,
            f"{o.noise_variance**0.5:.2f}",
            f"{o.latency_ms:.0f}",
            o.message,
        )
    console.print(table)
