"""Federated results and explanations as HTML, for notebooks' `_repr_html_`.

A title line (query, nodes that answered, partial flag, rho spent), the table with estimate
and interval columns and flags, and for results a compact chart (queries/present/chart.py).
Every text that comes from a result or a node (regions, groups, messages) is escaped.
"""

from __future__ import annotations

import math
from html import escape
from typing import TYPE_CHECKING, Any

from queries.combine import POOLED
from queries.present.cells import bin_label, group_columns, interval, number
from queries.present.chart import result_chart_svg
from queries.present.secure import compare_noise, guarantee_text, secure_guarantee
from queries.results import NodeStatus

if TYPE_CHECKING:
    from queries.results import Explanation, FederatedResult, NodeExplain

# A notebook shows this many rows at most; the frames have them all.
MAX_ROWS = 200
_CHART_WIDTH = 660

_STYLE = (
    "font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; font-size: 13px; color: #1a1a1a"
)
_CELL = "padding: 2px 8px; border-bottom: 1px solid #e0e0e0"
_NUM = f"{_CELL}; text-align: right; font-variant-numeric: tabular-nums"


def _th(text: str, numeric: bool = False) -> str:
    align = "right" if numeric else "left"
    return f'<th scope="col" style="{_CELL}; text-align: {align}">{escape(text)}</th>'


def _td(text: str, numeric: bool = False) -> str:
    return f'<td style="{_NUM if numeric else _CELL}">{escape(text)}</td>'


def _flags(row: dict[str, Any]) -> str:
    names = [f for f in ("suppressed", "partial", "approximate") if row.get(f)]
    if row.get("suppressed") and "approximate" in names:
        names.remove("approximate")  # a blank figure is neither exact nor approximate
    return ", ".join(names)


def _rho(x: float) -> str:
    return f"{x:.4g}"


def result_html(result: FederatedResult) -> str:
    """A result as notebooks show it: title line, the table with intervals, and a chart."""
    table = result.table
    groups = group_columns(table)
    ok = [o for o in result.nodes if o.status is NodeStatus.OK]
    spent = math.fsum(o.rho_charged for o in ok)
    title = [
        f"<strong>chc query {escape(result.query_id)}</strong>",
        f"{len(ok)} / {len(result.nodes)} nodes ok",
        f"rho spent {_rho(spent)} (sum over nodes)"
        + "".join(
            f"; {o.node}: charge unknown (timed out; Federation.resend tells)"
            for o in result.nodes
            if o.charge_unknown
        ),
    ]
    if result.partial:
        missing = ", ".join(f"{o.node} {o.status.value}" for o in result.nodes if o not in ok)
        title.append(
            '<span class="chc-flag partial" style="color: #a64200; font-weight: 600">'
            f"partial: {escape(missing)}</span>"
        )
    rows = table.to_pylist()
    head = ["region", *groups, "measure"]
    out = [
        f'<div class="chc-result" style="{_STYLE}">',
        f'<p class="chc-title">{" · ".join(title)}</p>',
    ]
    if result.secure_aggregation is not None:
        # A secure aggregate has pooled rows only: say why, and what it guarantees.
        out.append(
            '<p class="chc-secure">Secure aggregate (pooled rows only): '
            f"{escape(guarantee_text(result.secure_aggregation))}</p>"
        )
    out += [
        '<table class="chc-table" style="border-collapse: collapse">',
        "<thead><tr>"
        + "".join(_th(h) for h in head)
        + _th("estimate", True)
        + _th("95% CI", True)
        + _th("std error", True)
        + _th("flags")
        + "</tr></thead>",
        "<tbody>",
    ]
    for r in rows[:MAX_ROWS]:
        pooled = r["region"] == POOLED
        style = ' style="font-weight: 600; background: #fff3e6"' if pooled else ""
        measure = f"{r['measure']} {bin_label(r)}".strip()
        estimate = "suppressed" if r["estimate"] is None else number(r["estimate"])
        out.append(
            f'<tr class="{"pooled" if pooled else "region"}"{style}>'
            + "".join(_td(str(r[c])) for c in ("region", *groups))
            + _td(measure)
            + _td(estimate, True)
            + _td(interval(r.get("ci_low"), r.get("ci_high")), True)
            + _td(number(r.get("std_error")), True)
            + _td(_flags(r))
            + "</tr>"
        )
    out.append("</tbody></table>")
    if len(rows) > MAX_ROWS:
        out.append(
            f"<p>… and {len(rows) - MAX_ROWS} more rows: to_pandas() or to_arrow() has them all</p>"
        )
    nodes = "; ".join(
        f"{o.node} {o.status.value}"
        + (f" (rho {_rho(o.rho_charged)})" if o.status is NodeStatus.OK else f": {o.message}")
        for o in result.nodes
    )
    out.append(f'<p class="chc-nodes" style="color: #555555">Nodes: {escape(nodes)}</p>')
    if rows:
        out.append(result_chart_svg(result, width=_CHART_WIDTH))
    out.append("</div>")
    return "\n".join(out)


def explanation_html(explanation: Explanation) -> str:
    """An explanation as notebooks show it: per node, status, cells, cost, noise and budget."""
    nodes = list(explanation)
    ok = [e for e in nodes if e.status is NodeStatus.OK]
    rhos = sorted({_rho(e.rho) for e in ok})
    title = [
        "<strong>chc explain</strong> (nothing spent)",
        f"{len(ok)} / {len(nodes)} nodes can run it",
    ]
    if rhos:
        title.append(f"rho per node {escape(', '.join(rhos))}")
    out = [
        f'<div class="chc-explain" style="{_STYLE}">',
        f'<p class="chc-title">{" · ".join(title)}</p>',
        '<table class="chc-table" style="border-collapse: collapse">',
        "<thead><tr>"
        + _th("node")
        + _th("status")
        + _th("cells", True)
        + _th("rho", True)
        + _th("epsilon", True)
        + _th("noise sd per value")
        + _th("budget left", True)
        + _th("message")
        + "</tr></thead>",
        "<tbody>",
    ]
    for e in nodes:
        noise = "; ".join(
            f"{m.measure}: {number(math.sqrt(m.noise.variance))}"
            for m in e.measures
            if m.noise.variance >= 0
        )
        left = number(e.budget.rho_remaining) if e.budget is not None else ""
        ran = e.status is NodeStatus.OK
        out.append(
            f'<tr data-node="{escape(e.node, quote=True)}">'
            + _td(e.node)
            + _td(e.status.value)
            + _td(str(e.cells) if ran else "", True)
            + _td(_rho(e.rho) if ran else "", True)
            + _td(f"{e.epsilon:.3g}" if ran else "", True)
            + _td(noise)
            + _td(left, True)
            + _td(e.message)
            + "</tr>"
        )
    out.append("</tbody></table>")
    out += _secure_noise_html(nodes)
    out.append("</div>")
    return "\n".join(out)


def _secure_noise_html(nodes: list[NodeExplain]) -> list[str]:
    """A pooled_only query's pooled noise sd per component, per-node or secure; [] otherwise."""
    rows = compare_noise(nodes)
    guarantee = secure_guarantee(nodes)
    if not rows or guarantee is None:
        return []
    out = [
        f'<p class="chc-secure">Pooled noise sd, per-node noise or secure aggregation: '
        f"{escape(guarantee_text(guarantee, ran=False))}</p>",
        '<table class="chc-table chc-secure-noise" style="border-collapse: collapse">',
        "<thead><tr>"
        + _th("component")
        + _th("kind")
        + _th("per-node noise", True)
        + _th("secure aggregation", True)
        + _th("ratio", True)
        + "</tr></thead>",
        "<tbody>",
    ]
    for r in rows:
        out.append(
            f'<tr data-component="{escape(r.component, quote=True)}">'
            + _td(r.component)
            + _td(r.statistic)
            + _td(f"{number(r.per_node_sd)} ({r.nodes} nodes)", True)
            + _td(number(r.secure_sd), True)
            + _td(f"{r.ratio:.3g}x", True)
            + "</tr>"
        )
    out.append("</tbody></table>")
    return out
