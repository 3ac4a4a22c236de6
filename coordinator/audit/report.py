"""Spend reports over privacy ledgers: by node, analyst, view or pathway and period, as
tables, CSV and an SVG chart."""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import TextIO
from xml.sax.saxutils import escape

from coordinator.audit.budget import BudgetChecks, PolicyNote, number
from coordinator.audit.sources import LedgerSource
from protocols.budget.changes import POLICY_RECORD
from protocols.ledger.entry import RELEASED, decode_body
from queries.errors import ConfigError
from queries.mechanisms import rho_to_epsilon

# ---- spend report -------------------------------------------------------------------------


@dataclass(frozen=True)
class SpendRow:
    """Spend by one analyst on one view at one node in one budget period."""

    node: str
    period: str
    analyst: str
    view: str
    released: int
    refused: int
    rho: float
    delta: float

    @property
    def epsilon(self) -> float:
        """The (epsilon, delta) equivalent of the summed rho (zCDP composes by addition)."""
        return rho_to_epsilon(self.rho, self.delta) if 0 < self.delta < 1 else 0.0


DIMENSIONS = ("node", "analyst", "view", "period")


def period_label(caps: object) -> str:
    """A budget period's name for people: FY 2025/26, 2025, or all time."""
    if not isinstance(caps, dict) or not caps.get("period_start"):
        return "all time"
    start = date.fromisoformat(str(caps["period_start"]))
    if caps.get("period") == "financial-year":
        return f"FY {start.year}/{(start.year + 1) % 100:02d}"
    if caps.get("period") == "calendar-year":
        return str(start.year)
    return f"from {start.isoformat()}"


def spend_rows(sources: Iterable[LedgerSource]) -> list[SpendRow]:
    """Aggregate every ledger's entries by node, period, analyst and view."""
    acc: dict[tuple[str, str, str, str], list[float]] = {}
    for source in sources:
        for e in source.read():
            if e.head:
                continue
            try:
                b = decode_body(e.body)
            except ValueError:
                continue
            if b.get("record") == POLICY_RECORD:
                continue  # a change of caps, not a query (see policy_history)
            views = b.get("views")
            view = "+".join(str(v) for v in views) if isinstance(views, list) and views else "?"
            k = (
                str(b.get("node") or source.node),
                period_label(b.get("caps")),
                str(b.get("analyst")),
                view,
            )
            cell = acc.setdefault(k, [0, 0, 0.0, 0.0])
            rho = number(b.get("rho")) or 0.0
            if b.get("outcome") == RELEASED:
                cell[0] += 1
                cell[2] += rho
            else:
                cell[1] += 1
            cell[3] = max(cell[3], number(b.get("delta")) or 0.0)
    return [
        SpendRow(node, period, analyst, view, int(c[0]), int(c[1]), c[2], c[3])
        for (node, period, analyst, view), c in sorted(acc.items())
    ]


def policy_history(sources: Iterable[LedgerSource]) -> list[tuple[str, PolicyNote]]:
    """Every ledger's policy entries, in order: the caps from then on, loosenings, overrides.

    Anomalies in them are `chc audit verify`'s business; this only describes them.
    """
    found: list[tuple[str, PolicyNote]] = []
    for source in sources:
        checks = BudgetChecks(lambda *_: None)
        for e in source.read():
            try:
                b = decode_body(e.body) if not e.head else {}
            except ValueError:
                continue
            if b.get("record") == POLICY_RECORD:
                checks.policy_entry_body(e.sequence, b)
        node = source.node or source.label
        found += [(node, note) for note in checks.notes]
    return found


def summarise(rows: Iterable[SpendRow], by: str) -> list[SpendRow]:
    """Rows summed over every dimension but `by` (and node, since budgets are per node)."""
    if by not in DIMENSIONS:
        raise ConfigError(f"--by must be one of {list(DIMENSIONS)}, got {by!r}")
    acc: dict[tuple[str, str], SpendRow] = {}
    for r in rows:
        k = (r.node, getattr(r, by))
        old = acc.get(k)
        if old is None:
            acc[k] = SpendRow(
                node=r.node,
                period=r.period if by == "period" else "",
                analyst=r.analyst if by == "analyst" else "",
                view=r.view if by == "view" else "",
                released=r.released,
                refused=r.refused,
                rho=r.rho,
                delta=r.delta,
            )
        else:
            acc[k] = SpendRow(
                node=old.node,
                period=old.period,
                analyst=old.analyst,
                view=old.view,
                released=old.released + r.released,
                refused=old.refused + r.refused,
                rho=old.rho + r.rho,
                delta=max(old.delta, r.delta),
            )
    return [acc[k] for k in sorted(acc)]


CSV_FIELDS = ("node", "period", "analyst", "view", "released", "refused", "rho", "epsilon", "delta")


def write_csv(rows: Iterable[SpendRow], out: TextIO) -> None:
    """One line per (node, period, analyst, view)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in rows:
        numbers = (r.released, r.refused, repr(r.rho), repr(r.epsilon), repr(r.delta))
        writer.writerow([r.node, r.period, r.analyst, r.view, *numbers])


# A colour-blind-safe palette (Okabe & Ito), one colour per node.
_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


def svg_chart(rows: Iterable[SpendRow], by: str, *, title: str = "") -> str:
    """A horizontal stacked bar chart of rho spent per `by` value, one colour per node."""
    rows = list(rows)
    categories = sorted({str(getattr(r, by)) for r in rows})
    nodes = sorted({r.node for r in rows})
    colour = {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(nodes)}
    spend: dict[tuple[str, str], float] = defaultdict(float)
    for r in rows:
        spend[str(getattr(r, by)), r.node] += r.rho
    totals = {c: sum(spend[c, n] for n in nodes) for c in categories}
    top = max(totals.values(), default=0.0) or 1.0
    left, right, bar, gap, head = 190, 90, 22, 10, 50
    width = 760
    plot = width - left - right
    legend_y = head + len(categories) * (bar + gap) + 10
    height = legend_y + 30
    title = title or f"Privacy budget spent (zCDP rho) by {by}"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="15" '
        f'font-weight="bold">{escape(title)}</text>',
    ]
    for i, c in enumerate(categories):
        y = head + i * (bar + gap)
        out.append(
            f'<text x="{left - 8}" y="{y + bar * 0.7:.1f}" text-anchor="end">'
            f"{escape(c[:28] or '(none)')}</text>"
        )
        x = float(left)
        for n in nodes:
            w = spend[c, n] / top * plot
            if w > 0:
                out.append(
                    f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{bar}" '
                    f'fill="{colour[n]}"><title>{escape(n)}: {spend[c, n]:.6g}</title></rect>'
                )
            x += w
        out.append(f'<text x="{x + 6:.2f}" y="{y + bar * 0.7:.1f}">{totals[c]:.4g}</text>')
    x = float(left)
    for n in nodes:
        out.append(f'<rect x="{x:.1f}" y="{legend_y}" width="12" height="12" fill="{colour[n]}"/>')
        out.append(f'<text x="{x + 16:.1f}" y="{legend_y + 10}">{escape(n)}</text>')
        x += 24 + 8 * len(n)
    out.append("</svg>")
    return "\n".join(out) + "\n"
