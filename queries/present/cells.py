"""Reading a federated result's long table: its group columns, row labels and numbers.

Shared by the frames, the chart and the HTML view, so that all three name a row alike.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

# A query without group_by has one group; charts and tables need a label for it.
NO_GROUP = "all"
EN_DASH = "\u2013"


def group_columns(table: pa.Table) -> list[str]:
    """The group columns of a result table: those between `region` and `measure`."""
    names: list[str] = list(table.column_names)
    if "region" not in names or "measure" not in names:
        return []
    return names[names.index("region") + 1 : names.index("measure")]


def group_label(row: dict[str, Any], groups: list[str]) -> str:
    """A row's group as people read it: its group values, and its histogram bin if any."""
    parts = [str(row[c]) for c in groups]
    histogram_bin = bin_label(row)
    if histogram_bin:
        parts.append(histogram_bin)
    return ", ".join(parts) if parts else NO_GROUP


def bin_label(row: dict[str, Any]) -> str:
    """A histogram row's bin as "[lower, upper)", or "" for a row of another statistic."""
    lower, upper = row.get("bin_lower"), row.get("bin_upper")
    if lower is None or upper is None:
        return ""
    return f"[{number(lower)}, {number(upper)})"


def number(x: float | None) -> str:
    """A figure as a table shows it: whole numbers with thousands, others to 3 digits."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def interval(lo: float | None, hi: float | None) -> str:
    """A 95% interval as "lo\u2013hi" (an en dash; "lo to hi" when an end is negative, where a
    dash would read as a minus), or "" when an end is missing."""
    if lo is None or hi is None:
        return ""
    joint = EN_DASH if lo >= 0 and hi >= 0 else " to "
    return f"{number(lo)}{joint}{number(hi)}"
