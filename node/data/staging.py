"""The source-table pass of validation: structure, one quality scan per table, and staging.

Each OMOP table the node needs is checked against its requirements (node/data/omop.py: which
tables and columns must exist), scanned once for NOT NULL violations, unconvertible values and
rows of unknown persons, and read once more into a temporary table of the typed columns the
node uses (STAGED). This reads the custodian's source; the checks that follow work on the
staged tables alone (node/data/staged_checks.py), and node/data/validate.py runs them in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import duckdb

from node.data.findings import Level, ValidationReport
from node.data.omop import OmopSource, SourceTable
from node.data.tables import OMOP_TABLES, ColumnReq, TableReq
from queries.pathway import Pathway

STAGED: Final = {
    "person": "s_person_raw",
    "visit_occurrence": "s_visit",
    "condition_occurrence": "s_condition",
    "death": "s_death_raw",
    "location": "s_location_raw",
    "care_site": "s_care_site_raw",
    "observation_period": "s_observation",
    "concept_ancestor": "s_ancestor",
}


def _found(table: SourceTable) -> str:
    names = [c.name for c in table.columns.values()]
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return f"columns {shown} found"


def check_structure(source: OmopSource, report: ValidationReport) -> None:
    """Required tables and columns: refused if missing. An optional table that lacks one of
    its required columns (a header-less export, say) is dropped from `source` with a warning,
    so that everything after serves exactly what it serves without that table."""
    for req in OMOP_TABLES:
        table = source.table(req.name)
        if table is None:
            if req.required:
                report.add(
                    Level.ERROR,
                    req.name,
                    f"required table missing: expected {req.name}.parquet or {req.name}.csv "
                    f"(any case) in the folder, or a table {req.name} in the DuckDB file",
                )
            elif not any(f.where == req.name for f in source.findings):  # else: unreadable
                report.add(Level.NOTE, req.name, f"no such table: {req.if_absent}")
            continue
        missing = [c.name for c in req.columns if c.required and not table.has(c.name)]
        if missing and not req.required:
            expected = ", ".join(c.name for c in req.columns if c.required)
            report.add(
                Level.WARNING,
                req.name,
                f"{_found(table)}, expected {expected}; {req.if_absent} ({table.origin})",
            )
            del source.tables[req.name]
            continue
        for col in req.columns:
            if table.has(col.name):
                continue
            if col.required:
                report.add(
                    Level.ERROR,
                    f"{req.name}.{col.name}",
                    f"required column missing from {table.origin} ({_found(table)})",
                )
            else:
                report.add(
                    Level.NOTE if col.note_if_absent else Level.WARNING,
                    f"{req.name}.{col.name}",
                    f"column absent from {table.origin}: read as empty ({_if_absent(col)})",
                )


def _if_absent(col: ColumnReq) -> str:
    return {
        "month_of_birth": "births are taken as 1 July",
        "day_of_birth": "births are taken as the 1st of the month",
        "location_id": "imd_quintile is 'unknown'",
        "preceding_visit_occurrence_id": "emergency admissions are found by date only",
        "visit_occurrence_id": "conditions are matched to stays by date only",
        "care_site_id": "care_site is 'other' (visits) or from the visits (persons)",
    }.get(col.name, "treated as unknown")


def quality_scan(
    con: duckdb.DuckDBPyConnection, req: TableReq, table: SourceTable, report: ValidationReport
) -> int | None:
    """One pass over a source table: NOT NULL violations, unconvertible values, orphans.

    Returns the table's row count, or None if it could not be read."""
    present = [c for c in req.columns if table.has(c.name)]
    parts: list[str] = ["count(*)"]
    labels: list[tuple[str, ColumnReq]] = []
    for col in present:
        raw, typed = table.raw(col.name), table.typed(col)
        if col.not_null:
            parts.append(f"count(*) FILTER (WHERE {raw} IS NULL)")
            labels.append(("null", col))
        if not table.native(col):
            bad = f"{raw} IS NOT NULL AND ({typed}) IS NULL"
            parts.append(f"count(*) FILTER (WHERE {bad})")
            parts.append(f"min(CAST({raw} AS VARCHAR)) FILTER (WHERE {bad})")
            labels.append(("bad", col))
            labels.append(("example", col))
    join = ""
    if req.name != "person" and table.has("person_id") and req.name in STAGED:
        pid = table.typed(next(c for c in present if c.name == "person_id"))
        join = (
            f" LEFT JOIN (SELECT DISTINCT person_id AS known_id FROM s_person_raw) AS known "  # noqa: S608
            f"ON known.known_id = {pid}"
        )
        parts.append(f"count(*) FILTER (WHERE {pid} IS NOT NULL AND known.known_id IS NULL)")
        labels.append(("orphan", present[0]))
    sql = f"SELECT {', '.join(parts)} FROM {table.relation} AS src{join}"  # noqa: S608
    try:
        row = con.execute(sql).fetchall()[0]
    except duckdb.Error as exc:
        level = Level.ERROR if req.required else Level.WARNING
        lost = "" if req.required else f"; {req.if_absent}"
        report.add(level, req.name, f"cannot read {table.origin}: {first_line(exc)}{lost}")
        return None
    values = list(row[1:])
    level, ignored = (Level.ERROR, "") if req.strict else (Level.WARNING, ": ignored")
    for (what, col), value in zip(labels, values, strict=True):
        where = f"{req.name}.{col.name}"
        if what == "null" and value:
            report.add(level, where, f"NOT NULL column has empty values{ignored}", int(value))
        elif what == "bad" and value:
            example = values[labels.index(("example", col))]
            kind = "dates" if col.kind.value == "DATE" else "whole numbers"
            report.add(
                level,
                where,
                f"values that are not {kind} (e.g. {str(example)[:30]!r}){ignored}",
                int(value),
            )
        elif what == "orphan" and value:
            report.add(
                Level.WARNING,
                f"{req.name}.person_id",
                "rows whose person_id has no person row; they are ignored",
                int(value),
            )
    return int(row[0])


def stage(
    con: duckdb.DuckDBPyConnection, req: TableReq, table: SourceTable, where: str = ""
) -> None:
    select = ", ".join(f"{table.typed(c)} AS {c.name}" for c in req.columns)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {STAGED[req.name]} AS "  # noqa: S608 - quoted
        f"SELECT {select} FROM {table.relation} {where}"
    )


def stage_concepts(
    con: duckdb.DuckDBPyConnection,
    source: OmopSource,
    pathways: Sequence[Pathway],
) -> None:
    """s_concepts(pathway, concept_id): every pathway's concept set, with descendants."""
    rows = [(p.name, c) for p in pathways for c in p.conditions]
    con.execute("CREATE OR REPLACE TEMP TABLE s_concepts (pathway VARCHAR, concept_id BIGINT)")
    if rows:
        con.executemany("INSERT INTO s_concepts VALUES (?, ?)", rows)
    ancestor = source.table("concept_ancestor")
    expand = [p.name for p in pathways if p.descendants and p.conditions]
    if ancestor is None or not expand:
        return
    req = next(t for t in OMOP_TABLES if t.name == "concept_ancestor")
    listed = ", ".join(str(int(c)) for _, c in rows)
    stage(con, req, ancestor, f"WHERE {ancestor.typed(req.columns[0])} IN ({listed})")
    names = ", ".join(f"'{n}'" for n in expand)
    con.execute(
        f"""
        INSERT INTO s_concepts
        SELECT DISTINCT c.pathway, a.descendant_concept_id FROM s_concepts AS c
        JOIN s_ancestor AS a ON a.ancestor_concept_id = c.concept_id
        WHERE c.pathway IN ({names}) AND a.descendant_concept_id IS NOT NULL
        EXCEPT SELECT pathway, concept_id FROM s_concepts
        """  # noqa: S608 - names are checked identifiers
    )
    con.execute("DROP TABLE s_ancestor")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
