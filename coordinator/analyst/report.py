"""Rendering federated results for people (rich tables) and programs (JSON, CSV)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from queries.cohort import Allow, CohortPolicy
from queries.combine import COUNT_LIKE, POOLED
from queries.present.secure import compare_noise, guarantee_text, secure_guarantee
from queries.results import (
    FederatedResult,
    NodeDescription,
    NodeExplain,
    NodeOutcome,
    NodeStatus,
    SecureAggregation,
)
from queries.schema import ColumnSpec, ViewSpec
from queries.spec import Query, Statistic

FIGURE_KEYS = ("estimate", "std_error", "ci_low", "ci_high", "n")
FLAG_KEYS = ("suppressed", "approximate", "partial")


def result_rows(result: FederatedResult, query: Query) -> list[dict[str, Any]]:
    """One dict per figure: region, groups, measure, bin, estimate, interval and flags."""
    rows = []
    for r in result.table.to_pylist():
        row: dict[str, Any] = {
            "region": r["region"],
            "groups": {c: r[c] for c in query.group_by},
            "measure": r["measure"],
            "statistic": r["statistic"],
        }
        if r["bin_lower"] is not None:
            row["bin"] = [r["bin_lower"], r["bin_upper"]]
        row.update({k: r[k] for k in FIGURE_KEYS})
        row.update({k: bool(r[k]) for k in FLAG_KEYS})
        rows.append(row)
    return rows


def result_to_dict(result: FederatedResult, query: Query, *, title: str = "") -> dict[str, Any]:
    """A JSON-ready summary: rows with estimate and interval, and every node's status.

    A secure aggregate (pooled_only) also has "secure_aggregation": its guarantee and shares.
    """
    out: dict[str, Any] = {
        "title": title,
        "query_id": result.query_id,
        "query": query.to_dict(),
        "partial": result.partial,
        "rows": result_rows(result, query),
        "nodes": [_node_dict(o, query.rho) for o in result.nodes],
        "rho_spent_in_all": _spent_total(result, query.rho),
    }
    if result.secure_aggregation is not None:
        out["secure_aggregation"] = secure_aggregation_to_dict(result.secure_aggregation)
    return out


def secure_aggregation_to_dict(g: SecureAggregation, *, ran: bool = True) -> dict[str, Any]:
    """A secure aggregate's guarantee and each component's public noise share, for JSON.

    pooled_noise_sd is an upper bound on the pooled sum's noise sd per value, natural units.
    """
    return {
        "nodes": g.nodes,
        "threshold": g.threshold,
        "rho_threshold": g.rho_threshold,
        "rho_all_honest": g.rho_all_honest,
        "round": list(g.round),
        "summary": guarantee_text(g, ran=ran),
        "components": [
            {
                "component": c.component,
                "length": c.length,
                "upscale": c.upscale,
                "share_scale": c.share_scale,
                "unit": c.unit,
                "rho": c.rho,
                "rho_threshold": c.rho_threshold,
                "rho_all_honest": c.rho_all_honest,
                "pooled_noise_sd": math.sqrt(g.pooled_variance(c.component)),
            }
            for c in g.components
        ],
    }


def _node_dict(o: NodeOutcome, rho: float) -> dict[str, Any]:
    """One node's outcome: its status, what it charged (null when not known, with the most
    it could have charged), its receipt and its budget."""
    return {
        "node": o.node,
        "status": o.status.value,
        "message": o.message,
        "rho_spent": None if o.charge_unknown else o.rho_charged,
        "rho_at_most": rho if o.charge_unknown else o.rho_charged,
        "charge_unknown": o.charge_unknown,
        "resent": o.resent,
        # The node's receipt: its query id and the ledger entry that recorded the charge.
        "node_query_id": o.node_query_id or None,
        "ledger_sequence": o.ledger_sequence or None,
        "rho_spent_total": o.budget.rho_spent if o.budget else None,
        "rho_remaining": o.budget.rho_remaining if o.budget else None,
    }


def _charges(result: FederatedResult) -> tuple[float, list[str]]:
    """The sum of the charges known, and the nodes whose charge is not known."""
    unknown = [o.node for o in result.nodes if o.charge_unknown]
    return sum(o.rho_charged for o in result.nodes if not o.charge_unknown), unknown


def _spent_total(result: FederatedResult, rho: float) -> dict[str, Any]:
    """What the query charged across the nodes: known charges, and the nodes whose charge
    is not known (each at most rho), never counted as 0. Re-sent releases were charged
    when first answered; their rho is in known, as on their receipts."""
    known, unknown = _charges(result)
    return {
        "known": known,
        "unknown_nodes": unknown,
        "at_most": known + rho * len(unknown),
    }


def result_to_csv(result: FederatedResult, query: Query) -> str:
    """Flat CSV: one line per figure, group columns expanded."""
    out = io.StringIO()
    fields = ["region", *query.group_by, "measure", "statistic", "bin_lower", "bin_upper"]
    fields += [*FIGURE_KEYS, *FLAG_KEYS]
    writer = csv.DictWriter(out, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in result.table.to_pylist():
        writer.writerow(r)
    return out.getvalue()


def _sentence(text: str) -> str:
    """text with a capital first letter (str.capitalize would lower the rest)."""
    return text[:1].upper() + text[1:]


def to_json(payload: object) -> str:
    """Stable, readable JSON."""
    return json.dumps(payload, indent=2, sort_keys=False)


def _fmt(x: float | None, stat: Statistic) -> str:
    if x is None:
        return "*"
    if stat in COUNT_LIKE:
        return f"{x:,.0f}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:,.2f}"


def _figure_cells(r: dict[str, Any]) -> tuple[str, str, bool]:
    """Estimate and interval text of one figure, and whether it is approximate."""
    stat = Statistic(r["statistic"])
    if r["suppressed"]:
        return "*", "suppressed", False
    estimate = _fmt(r["estimate"], stat)
    approximate = bool(r["approximate"]) and r["estimate"] is not None
    if approximate:
        estimate += " ~"
    return estimate, f"{_fmt(r['ci_low'], stat)} to {_fmt(r['ci_high'], stat)}", approximate


def print_result(
    console: Console,
    result: FederatedResult,
    query: Query,
    *,
    title: str = "",
    labels: Mapping[str, str] | None = None,
) -> None:
    """A table of per-region and pooled estimates with 95% intervals, then node statuses.

    One row per region and group with an estimate and interval column per measure; a query
    with a histogram is shown one figure per row instead, since bins vary in number.
    """
    rows = result.table.to_pylist()
    wide = not any(m.statistic is Statistic.HISTOGRAM for m in query.measures)
    table = Table(title=title or None, title_justify="left", show_lines=False)
    table.add_column("Region")
    for c in query.group_by:
        table.add_column(c.replace("_", " ").capitalize())
    single = len(query.measures) == 1
    if wide:
        for m in query.measures:
            label = "" if single else f"{m.name.replace('_', ' ')}: "
            table.add_column(f"{label}estimate".capitalize(), justify="right")
            table.add_column(f"{label}95% interval".capitalize(), justify="right")
    else:
        table.add_column("Measure")
        table.add_column("Estimate", justify="right")
        table.add_column("95% interval", justify="right")
    flagged = False
    cells: dict[tuple[object, ...], list[str]] = {}
    for r in rows:
        region = (labels or {}).get(r["region"], r["region"])
        key = (r["region"], *(r[c] for c in query.group_by))
        if not wide:
            key = (*key, r["measure"], r["bin_lower"])
        row = cells.setdefault(key, [region, *(str(r[c]) for c in query.group_by)])
        if not wide:
            label = r["measure"]
            if r["bin_lower"] is not None:
                label += f" [{r['bin_lower']:g}, {r['bin_upper']:g})"
            row.append(label)
        estimate, interval, approximate = _figure_cells(r)
        flagged = flagged or approximate
        row += [estimate, interval]
    last_region = None
    for key, row in cells.items():
        if last_region is not None and key[0] != last_region:
            table.add_section()
        last_region = key[0]
        table.add_row(*row, style="bold" if key[0] == POOLED else None)
    console.print(table)
    if flagged:
        console.print("[dim]~ interval from the delta method or a DP histogram (approximate)[/]")
    if result.partial:
        console.print(
            "[bold yellow]Partial result:[/] the pooled rows cover only the nodes marked ok."
        )
    if result.secure_aggregation is not None:
        console.print(escape(_sentence(guarantee_text(result.secure_aggregation))))
    print_nodes(console, result, rho=query.rho)


def print_nodes(console: Console, result: FederatedResult, *, rho: float | None = None) -> None:
    """Each node's status and the privacy budget it spent (no latency: it is not released),
    then the total; a node whose charge is not known shows "unknown (at most rho)"."""
    table = Table(title="Nodes", title_justify="left")
    for col in ("Node", "Status", "rho spent", "Receipt", "rho used / total", "Note"):
        table.add_column(col, justify="right" if col == "rho spent" else "left")
    for o in result.nodes:
        colour = "green" if o.status is NodeStatus.OK else "red"
        used = f"{o.budget.rho_spent:.4g} / {o.budget.rho_total:.4g}" if o.budget else "-"
        if o.charge_unknown:
            spent = "unknown" + (f" (at most {rho:.4g})" if rho is not None else "")
        else:
            spent = f"{o.rho_charged:.4g}"
        receipt = f"ledger #{o.ledger_sequence}" if o.ledger_sequence else "-"
        table.add_row(
            escape(o.node),
            f"[{colour}]{o.status.value}[/]",
            spent,
            receipt,
            used,
            escape(
                o.message
                or (
                    "re-sent its kept release: charged when first answered, not again"
                    if o.resent
                    else ""
                )
            ),
        )
    console.print(table)
    known, unknown = _charges(result)
    line = f"rho spent: {known:.4g} in all at the nodes that answered"
    if unknown:
        most = f"at most {rho:.4g} each" if rho is not None else "each at most the query's rho"
        line += f"; not known at {', '.join(unknown)} ({most})"
    console.print(escape(line))


def print_explain(console: Console, explains: Sequence[NodeExplain], query: Query) -> None:
    """What each node would compute, what it would cost, and the noise of each component.

    A pooled_only query ends with the pooled noise of each component both ways: with every
    node's full noise and with secure aggregation's shares, so the analyst can choose.
    """
    pooled = " (pooled only, by secure aggregation)" if query.pooled_only else ""
    console.print(
        f"[bold]Plan for[/] {query.view}{pooled}: rho {query.rho:g} per node (nothing spent)"
    )
    for e in explains:
        if e.status is not NodeStatus.OK:
            console.print(f"[red]{e.node}: {e.status.value}[/] {e.message}")
            continue
        remaining = f"{e.budget.rho_remaining:.4g}" if e.budget else "?"
        console.print(
            f"\n[bold]{e.node}[/]: {e.cells} value(s), rho {e.rho:.4g} "
            f"(epsilon {e.epsilon:.3g}), budget remaining {remaining}"
        )
        console.print(e.plan, markup=False)
        table = Table(show_header=True)
        for col in ("Component", "Kind", "rho", "Noise sd", "Sensitivity"):
            table.add_column(col)
        for m in e.measures:
            table.add_row(
                m.measure,
                m.statistic,
                f"{m.rho:.4g}",
                f"{m.noise.scale:.4g}",
                f"{m.noise.sensitivity:.4g}",
            )
        console.print(table)
    if query.pooled_only:
        _print_noise_comparison(console, explains)


def _print_noise_comparison(console: Console, explains: Sequence[NodeExplain]) -> None:
    """The pooled noise sd per component with per-node noise and with secure aggregation."""
    rows = compare_noise(explains)
    guarantee = secure_guarantee(explains)
    if not rows or guarantee is None:
        console.print(
            "\n[yellow]No node gave the secure-aggregation noise:[/] the pooled noise cannot "
            "be compared (a node of an older release, or none can run the query)."
        )
        return
    table = Table(
        title="Pooled noise sd: per-node noise or secure aggregation", title_justify="left"
    )
    for col in ("Component", "Kind", "Per-node noise", "Secure aggregation", "Ratio"):
        table.add_column(col, justify="left" if col in ("Component", "Kind") else "right")
    for r in rows:
        table.add_row(
            escape(r.component),
            r.statistic,
            f"{r.per_node_sd:.4g} ({r.nodes} nodes)",
            f"{r.secure_sd:.4g}",
            f"{r.ratio:.3g}x",
        )
    console.print()
    console.print(table)
    console.print(escape(_sentence(guarantee_text(guarantee, ran=False))))


def explain_to_dict(e: NodeExplain) -> dict[str, Any]:
    """A JSON-ready explanation of one node's plan and cost.

    A pooled_only query's node also has "secure_components" (the pooled sum's noise sd per
    component under secure aggregation) and "secure_aggregation" (its guarantee).
    """
    out: dict[str, Any] = {
        "node": e.node,
        "status": e.status.value,
        "message": e.message,
        "plan": e.plan,
        "rho": e.rho,
        "epsilon": e.epsilon,
        "cells": e.cells,
        "rho_remaining": e.budget.rho_remaining if e.budget else None,
        "components": [
            {
                "component": m.measure,
                "kind": m.statistic,
                "rho": m.rho,
                "noise_sd": m.noise.scale,
                "sensitivity": m.noise.sensitivity,
            }
            for m in e.measures
        ],
    }
    if e.secure_measures:
        out["secure_components"] = [
            {
                "component": m.measure,
                "kind": m.statistic,
                "rho": m.rho,
                "pooled_noise_sd": math.sqrt(m.noise.variance) if m.noise.variance >= 0 else None,
            }
            for m in e.secure_measures
        ]
    if e.secure_aggregation is not None:
        out["secure_aggregation"] = secure_aggregation_to_dict(e.secure_aggregation, ran=False)
    return out


class Failure(NamedTuple):
    """Why a command's answer is no answer: the one line the CLI exits with."""

    refused: bool  # every node refused, rather than not answering
    reason: str


def nobody_answered(nodes: Sequence[NodeOutcome | NodeExplain]) -> Failure:
    """Why no node answered: every node refused, or which did not answer and how."""
    if not nodes:
        return Failure(False, "no node answered: the hub has no nodes configured")
    if all(o.status is NodeStatus.REFUSED for o in nodes):
        reasons = sorted({o.message for o in nodes if o.message})
        detail = f": {'; '.join(reasons)}" if reasons else ""
        return Failure(True, f"every node refused the query{detail}")
    statuses = ", ".join(f"{o.node} {o.status.value}" for o in nodes)
    return Failure(False, f"no node answered ({statuses})")


def result_failure(result: FederatedResult) -> Failure | None:
    """Why a federated result answers nothing, or None if some node released figures."""
    if not any(o.status is NodeStatus.OK for o in result.nodes):
        return nobody_answered(result.nodes)
    if result.table.num_rows == 0:
        return Failure(False, "the result is empty: the nodes that answered released no figures")
    return None


def explain_failure(explains: Sequence[NodeExplain]) -> Failure | None:
    """Why an Explain explains nothing (no node could plan the query), or None."""
    if any(e.status is NodeStatus.OK for e in explains):
        return None
    return nobody_answered(explains)


def _bounds(c: ColumnSpec) -> list[float] | None:
    return [c.lower, c.upper] if c.lower is not None and c.upper is not None else None


def view_to_dict(v: ViewSpec) -> dict[str, Any]:
    """A view's public metadata: every column with its kind, bounds and domain."""
    return {
        "name": v.name,
        "description": v.description,
        "max_rows_per_person": v.max_rows_per_person,
        "max_persons": v.max_persons,
        "columns": [
            {
                "name": c.name,
                "kind": c.type.value,
                "description": c.description,
                "person_level": c.person_level,
                "bounds": _bounds(c),
                "domain": list(c.domain),
            }
            for c in v.columns
        ],
    }


def nodes_to_dict(
    found: Sequence[NodeDescription], missing: Sequence[NodeOutcome]
) -> dict[str, Any]:
    """`chc nodes --json`: each node's reference date, budget and catalog, and who is missing."""
    return {
        "nodes": [
            {
                "node": d.node,
                "protocol_version": d.protocol_version,
                "reference_date": (
                    d.catalog.reference_date.isoformat() if d.catalog.reference_date else None
                ),
                "budget": {
                    "rho_total": d.budget.rho_total,
                    "rho_spent": d.budget.rho_spent,
                    "rho_remaining": d.budget.rho_remaining,
                    "max_rho_per_query": d.budget.max_rho_per_query,
                    "delta": d.budget.delta,
                },
                "views": [view_to_dict(v) for v in d.catalog.views],
                "ad_hoc_cohorts": {
                    "allow": d.cohorts.allow.value,
                    "concepts": list(d.cohorts.concepts),
                },
            }
            for d in found
        ],
        "unavailable": [
            {"node": o.node, "status": o.status.value, "message": o.message} for o in missing
        ],
    }


def cohorts_text(policy: CohortPolicy) -> str:
    """Which ad hoc cohorts a node answers, in words."""
    if policy.allow is Allow.LISTED:
        shown = ", ".join(str(c) for c in policy.concepts[:10])
        more = f" and {len(policy.concepts) - 10} more" if len(policy.concepts) > 10 else ""
        return f"on concepts {shown}{more} only"
    return "any" if policy.allow is Allow.ANY else "none"


def _number(x: float) -> str:
    return f"{x:g}" if not float(x).is_integer() else f"{int(x)}"


def print_catalogs(
    console: Console, found: Sequence[NodeDescription], missing: Sequence[NodeOutcome]
) -> None:
    """`chc nodes`: per node its budget and reference date, then a table of columns per view."""
    for d in found:
        b = d.budget
        ref = d.catalog.reference_date.isoformat() if d.catalog.reference_date else "not given"
        # Names and descriptions come from the node: escaped, so no text is read as markup.
        console.print(
            f"[bold]{escape(d.node)}[/] ({escape(d.protocol_version)}): rho {b.rho_spent:.4g} "
            f"spent of {b.rho_total:.4g}, at most {b.max_rho_per_query:.4g} per query; "
            f"reference date {ref}; ad hoc cohorts: {cohorts_text(d.cohorts)}"
        )
        for v in d.catalog.views:
            # The view's line is printed, not a table title: a title is padded to the width.
            console.print(
                f"[bold]{escape(v.name)}[/]: {escape(v.description)} "
                f"[dim](at most {v.max_rows_per_person} row(s) per person)[/]"
            )
            table = Table()
            for col in ("column", "kind", "bounds", "domain", "description"):
                table.add_column(col)
            for c in v.columns:
                bounds = _bounds(c)
                table.add_row(
                    escape(c.name),
                    c.type.value,
                    f"{_number(bounds[0])} to {_number(bounds[1])}" if bounds else "",
                    escape(", ".join(c.domain)),
                    escape(c.description),
                )
            console.print(table)
    for o in missing:
        console.print(f"[red]{escape(o.node)}: {o.status.value}[/] {escape(o.message)}")
