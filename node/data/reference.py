"""The reference date: the day the views' ages and windows end, and where it came from.

node.toml's `reference_date` wins. Without it the node takes the end of its data: the latest
observation_period end date, or without one the latest visit end, rounded up to the end of
its month. The date is published (Describe, `Catalog.reference_date`), and a day would pin
down one person's last record; the month's end is shared by everyone discharged that month.
Dates after today are open-ended periods (2099-12-31 is a common placeholder) or errors, so
they are left out of the maximum. Runs on the staged tables (node/data/staging.py).
"""

from __future__ import annotations

import calendar
from datetime import date
from typing import Final

import duckdb

from node.data import catalog as cat
from node.data.findings import Level, ValidationReport
from node.data.omop import OmopSource

FROM_CONFIG: Final = "from node.toml"
# Where the end of the data is read from, in order: staged table, column, OMOP name.
_ENDS: Final = (
    ("s_observation", "observation_period_end_date", "observation_period"),
    ("s_visit", "greatest(visit_end_date, visit_start_date)", "visit_occurrence"),
)


def month_end(day: date) -> date:
    """The last day of day's month."""
    return date(day.year, day.month, calendar.monthrange(day.year, day.month)[1])


def _latest(
    con: duckdb.DuckDBPyConnection, staged: str, column: str, today: date
) -> tuple[date | None, int]:
    """The latest date up to today, and how many rows are later than today."""
    row = con.execute(
        f"SELECT max({column}) FILTER (WHERE {column} <= ?), "  # noqa: S608 - constants
        f"count(*) FILTER (WHERE {column} > ?) FROM {staged}",
        [today, today],
    ).fetchall()[0]
    latest = row[0] if isinstance(row[0], date) else None
    return latest, int(row[1])


def resolve(
    con: duckdb.DuckDBPyConnection,
    configured: date | None,
    source: OmopSource,
    report: ValidationReport,
    *,
    today: date | None = None,
) -> date:
    """The reference date to use; records it, and where it came from, in the report."""
    if configured is not None:
        report.reference_date, report.reference_origin = configured, FROM_CONFIG
        return configured
    today = today or date.today()
    for staged, column, table in _ENDS:
        if source.table(table) is None:
            continue
        latest, later = _latest(con, staged, column, today)
        if later:
            report.add(
                Level.NOTE,
                table,
                f"end dates after today ({today.isoformat()}), taken as open-ended: not used "
                "for the reference date",
                later,
            )
        if latest is not None:
            chosen = month_end(latest)
            report.reference_date = chosen
            report.reference_origin = (
                f"from the data: latest {table} end {latest.isoformat()}, rounded to month end"
            )
            return chosen
    chosen = month_end(today)
    report.add(
        Level.WARNING,
        "reference_date",
        f"no visit or observation period ends on or before today: the reference date is "
        f"{chosen.isoformat()}, the end of this month; set reference_date in node.toml",
    )
    report.reference_date, report.reference_origin = chosen, "the end of this month (no data)"
    return chosen


def window_checks(
    con: duckdb.DuckDBPyConnection, report: ValidationReport, end_of_data: date | None
) -> None:
    """Warn when most visits or condition records fall outside the visit years."""
    ref = report.reference_date
    if ref is None:
        return
    years = cat.visit_years(ref)
    first = date(int(years[0]), 1, 1)
    row = con.execute(
        """
        SELECT (SELECT count(*) FROM s_visit),
               (SELECT count(*) FROM s_visit WHERE visit_start_date BETWEEN $1 AND $2),
               (SELECT count(*) FROM s_condition),
               (SELECT count(*) FROM s_condition WHERE condition_start_date BETWEEN $1 AND $2)
        """,
        [first, ref],
    ).fetchall()[0]
    visits, visits_in, conditions, conditions_in = (int(v) for v in row)
    if report.reference_origin == FROM_CONFIG and end_of_data is not None:
        advice = (
            f"set reference_date to the end of your data ({end_of_data.isoformat()}), or "
            "remove it from node.toml to take that default"
        )
    else:
        advice = "older records are not in the views (they cover the ten years to the end)"
    span = f"{years[0]}-{years[-1]}"
    for what, total, inside in (
        ("visits", visits, visits_in),
        ("condition records of the served pathways", conditions, conditions_in),
    ):
        if total and inside * 2 < total:
            report.add(
                Level.WARNING,
                "reference_date",
                f"only {inside:,} of {total:,} {what} fall in the visit years {span} "
                f"(up to {ref.isoformat()}); {advice}",
            )


def end_of_data(con: duckdb.DuckDBPyConnection, source: OmopSource) -> date | None:
    """What the default reference date would be (for advice when node.toml sets one)."""
    probe = ValidationReport("")
    chosen = resolve(con, None, source, probe)
    return chosen if probe.reference_origin.startswith("from the data") else None
