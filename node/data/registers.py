"""Reading and checking the consent registers: the files, row by row, into consent_decisions.

Each register (CSV or Parquet, columns as described in node/data/consent.py) is read into a
temporary table with every row checked: a person_id that is not an exact whole number, a date
that is not a date, or a value outside the vocabulary below refuses the data, and the finding
names the first offending lines of the file. This is kept apart from node/data/consent.py, which
holds the policy and the rules that decide who is excluded, because reading files exactly (ids
never through a floating-point cast, CSV line numbers that agree with DuckDB) is a concern of
its own and most of the code.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

import duckdb

from node.data.findings import Finding, Level
from node.data.omop import sql_ident, sql_string

if TYPE_CHECKING:
    from node.data.consent import ConsentPolicy

DECISIONS_TABLE: Final = "consent_decisions"

_SOURCES: Final = ("ndoo", "local")
_OUT: Final = ("opt_out", "optout", "opt-out", "dissent", "out")
_IN: Final = ("opt_in", "optin", "opt-in", "consent", "in")
_PARENT: Final = ("parent", "guardian", "parent_or_guardian", "proxy")
_SELF: Final = ("self", "patient", "person", "child")
_TRUE: Final = ("yes", "y", "true", "t", "1")
_FALSE: Final = ("no", "n", "false", "f", "0")


def _relation(path: Path) -> str | None:
    kind = _relation_kind(path)
    if kind == "parquet":
        return f"read_parquet({sql_string(str(path.resolve()))})"
    if kind == "csv":
        return f"read_csv({sql_string(str(path.resolve()))}, header = true, all_varchar = true)"
    return None


def _text(column: str | None, default: str) -> str:
    if column is None:
        return sql_string(default)
    # A blank cell takes the default, like an absent column.
    text = f"nullif(lower(trim(CAST({sql_ident(column)} AS VARCHAR))), '')"
    return f"coalesce({text}, {sql_string(default)})"


def sql_list(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(sql_string(v) for v in values) + ")"


def _not_in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} NOT IN {sql_list(values)}"


# A person_id is written as digits, with an optional sign and surrounding blanks; DuckDB's own
# casts would also take '12.6' (as 13), '1e3', '0x1F' and '1_000', and DOUBLE rounds ids
# above 2^53, so an opt-out could land on a neighbour. The node reads person_id as BIGINT.
_ID_DIGITS: Final = r"^\s*([+-]?[0-9]+)\s*$"
ID_MIN: Final = -(2**63)
ID_MAX: Final = 2**63 - 1
_FLOAT_TYPES: Final = ("FLOAT", "DOUBLE", "REAL", "FLOAT4", "FLOAT8")
SHOWN_ROWS: Final = 5  # rows (and values) a finding lists; its count says how many in all


def _person_id(column: str) -> str:
    """SQL columns id_text, id_whole and person_id: the id exactly, or NULL."""
    text = f"CAST({sql_ident(column)} AS VARCHAR)"
    digits = f"regexp_extract(coalesce({text}, ''), {sql_string(_ID_DIGITS)}, 1)"
    # HUGEINT holds any 38-digit number exactly; longer digit strings are out of range too.
    huge = f"TRY_CAST(nullif({digits}, '') AS HUGEINT)"
    return (
        f"{text} AS id_text, {digits} <> '' AS id_whole, "
        f"CASE WHEN {huge} BETWEEN {ID_MIN} AND {ID_MAX} THEN CAST({huge} AS BIGINT) END "
        "AS person_id"
    )


def _csv_lines(
    con: duckdb.DuckDBPyConnection, path: Path, rows: int, ids: dict[int, str | None]
) -> dict[int, int] | None:
    """File line numbers of the given data rows (0-based, as DuckDB read them), or None.

    DuckDB skips blank lines and lets quoted fields span lines, so the line is found by
    reading the file again with the dialect DuckDB sniffed. The answer is used only if it
    agrees with DuckDB: the same number of rows, and the same person_id text on every row
    asked about; otherwise the report gives data-row numbers instead.
    """
    try:
        sniffed = con.execute(
            "SELECT Delimiter, Quote, Escape, SkipRows "  # noqa: S608 - quoted path
            f"FROM sniff_csv({sql_string(str(path.resolve()))}, header = true)"
        ).fetchall()[0]
    except duckdb.Error:
        return None
    delimiter, quote, escape, skip = (str(v) for v in sniffed)
    quoting = quote != "(empty)"
    if len(delimiter) != 1 or (quoting and len(quote) != 1):
        return None
    doubled = escape in ("(empty)", quote)
    found: dict[int, int] = {}
    row = -1
    try:
        reader = csv.reader(
            _text_lines(path),
            delimiter=delimiter,
            quotechar=quote if quoting else None,
            quoting=csv.QUOTE_MINIMAL if quoting else csv.QUOTE_NONE,
            doublequote=doubled,
            escapechar=None if doubled else escape,
            strict=False,
        )
        id_index: int | None = None
        start = 1
        for record in reader:
            line, start = start, reader.line_num + 1  # the record's first line, the next's
            if not record or line <= int(skip):
                continue  # DuckDB skips blank lines
            if id_index is None:
                names = [n.strip().lower() for n in record]
                if "person_id" not in names:
                    return None
                id_index = names.index("person_id")
                continue
            row += 1
            if row in ids:
                got = record[id_index] if id_index < len(record) else ""
                if got != (ids[row] or ""):
                    return None
                found[row] = line
    except (OSError, csv.Error, ValueError):
        return None
    return found if row + 1 == rows and len(found) == len(ids) else None


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of a text file, gzip-compressed or not."""
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="") as f:
            yield from f
    else:
        with path.open(encoding="utf-8-sig", errors="replace", newline="") as f:
            yield from f


def _rows_detail(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    rows: int,
    shown: list[tuple[int, str | None, str | None]],
    more: int,
) -> str:
    """Where the rows are and what they hold: "lines 3 ('12.6'), 9 ('')" for a CSV file,
    "data rows 2 ('12.6')" for Parquet."""
    lines = (
        _csv_lines(con, path, rows, {r: id_text for r, id_text, _ in shown})
        if _relation_kind(path) == "csv"
        else None
    )
    if lines is not None:
        label, numbers = "line", [lines[r] for r, _, _ in shown]
    else:
        # Parquet (or a CSV the node could not map to lines): 1-based rows after the header.
        label, numbers = "data row", [r + 1 for r, _, _ in shown]
    parts = [
        f"{n} ({'' if v is None else v!r})" for n, (_, _, v) in zip(numbers, shown, strict=True)
    ]
    plural = "s" if len(parts) > 1 else ""
    return f"{label}{plural} {', '.join(parts)}" + (f" and {more:,} more" if more else "")


def _relation_kind(path: Path) -> str | None:
    lower = path.name.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
        return "csv"
    return None


def _load_one(con: duckdb.DuckDBPyConnection, path: Path, index: int) -> list[Finding]:
    where = f"consent register {path}"
    if not path.is_file():
        return [Finding(Level.ERROR, where, "the file does not exist (the node fails closed)")]
    relation = _relation(path)
    if relation is None:
        return [Finding(Level.ERROR, where, "expected a .csv or .parquet file")]
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()  # noqa: S608
    except duckdb.Error as exc:
        return [
            Finding(
                Level.ERROR,
                where,
                "cannot be read as CSV or Parquet; fix or replace the file (the node fails closed)",
                detail=str(exc).strip().splitlines()[0] if str(exc).strip() else None,
            )
        ]
    columns = {str(r[0]).lower(): str(r[0]) for r in described}
    types = {str(r[0]).lower(): str(r[1]).upper() for r in described}
    date_col = next(
        (columns[c] for c in ("date", "recorded_date", "decision_date") if c in columns), None
    )
    if "person_id" not in columns or date_col is None:
        return [
            Finding(
                Level.ERROR,
                where,
                f"needs columns person_id and date; it has {sorted(columns)}",
            )
        ]
    if types["person_id"] in _FLOAT_TYPES:
        return [
            Finding(
                Level.ERROR,
                where,
                f"person_id is stored as {types['person_id']}, which rounds ids above 2^53 "
                "to a neighbour; write it as an integer or text column (the node fails "
                "closed)",
            )
        ]
    raw_date = f"CAST({sql_ident(date_col)} AS VARCHAR)"
    table = f"consent_raw_{index}"
    # Row order is the file's (DuckDB preserves insertion order), so rowid numbers the rows.
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {table} AS
        SELECT {_person_id(columns["person_id"])},
               {raw_date} AS date_text,
               coalesce(TRY_CAST({raw_date} AS DATE),
                        CAST(TRY_CAST({raw_date} AS TIMESTAMP) AS DATE),
                        CAST(try_strptime({raw_date}, '%d/%m/%Y') AS DATE)) AS date,
               {_text(columns.get("source"), "local")} AS source,
               {_text(columns.get("decision"), "opt_out")} AS decision,
               {_text(columns.get("decided_by"), "self")} AS decided_by,
               {_text(columns.get("gillick_competent"), "no")} AS gillick
        FROM {relation}
        """  # noqa: S608 - identifiers and paths are quoted
    )
    fails = " (the node fails closed)"
    # (what is wrong and what to do, the rows it applies to, the value to show)
    checks = [
        (
            "person_id is missing or not a whole number (write digits only, e.g. 42; 42.0, "
            "12.6 and 1e3 are refused: floating-point exports write them, and round ids "
            f"above 2^53); correct or remove these rows{fails}",
            "NOT id_whole",
            "id_text",
        ),
        (
            f"person_id is outside the range of OMOP person_ids ({ID_MIN} to {ID_MAX}); "
            f"correct or remove these rows{fails}",
            "id_whole AND person_id IS NULL",
            "id_text",
        ),
        (
            f"date is missing or not a date (ISO 8601 or DD/MM/YYYY); fix these rows{fails}",
            "date IS NULL",
            "date_text",
        ),
        (
            f"source is not ndoo or local; fix these rows{fails}",
            _not_in("source", _SOURCES),
            "source",
        ),
        (
            f"decision is not one of {list(_OUT + _IN)}; fix these rows{fails}",
            _not_in("decision", _OUT + _IN),
            "decision",
        ),
        (
            f"decided_by is not one of {list(_SELF + _PARENT)}; fix these rows{fails}",
            _not_in("decided_by", _SELF + _PARENT),
            "decided_by",
        ),
        (
            f"gillick_competent is not yes or no; fix these rows{fails}",
            _not_in("gillick", _TRUE + _FALSE),
            "gillick",
        ),
    ]
    select = ", ".join(f"count(*) FILTER (WHERE {cond})" for _, cond, _ in checks)
    rows, *counts = con.execute(f"SELECT count(*), {select} FROM {table}").fetchall()[0]  # noqa: S608
    findings = []
    for (what, cond, value), n in zip(checks, counts, strict=True):
        if not n:
            continue
        first = con.execute(
            f"SELECT rowid, id_text, CAST({value} AS VARCHAR) FROM {table} "  # noqa: S608
            f"WHERE {cond} ORDER BY rowid LIMIT {SHOWN_ROWS}"
        ).fetchall()
        shown = [(int(r[0]), r[1], r[2]) for r in first]
        detail = _rows_detail(con, path, int(rows), shown, int(n) - len(shown))
        findings.append(Finding(Level.ERROR, where, what, int(n), detail))
    return findings


def load_registers(con: duckdb.DuckDBPyConnection, policy: ConsentPolicy) -> list[Finding]:
    """Read every register into the temporary table consent_decisions, checking each row."""
    findings: list[Finding] = []
    for i, path in enumerate(policy.registers):
        findings += _load_one(con, path, i)
    if any(f.level is Level.ERROR for f in findings):
        return findings
    parts = [
        f"""
        SELECT {i} AS register, rowid AS row, person_id, date, source,
               CASE WHEN decision IN {sql_list(_OUT)} THEN 'out' ELSE 'in' END AS decision,
               CASE WHEN decided_by IN {sql_list(_PARENT)} THEN 'parent' ELSE 'self' END
                   AS decided_by,
               gillick IN {sql_list(_TRUE)} AS gillick
        FROM consent_raw_{i}
        """  # noqa: S608 - constant SQL
        for i in range(len(policy.registers))
    ]
    union = (
        " UNION ALL ".join(parts)
        if parts
        else (
            "SELECT 0 AS register, CAST(0 AS BIGINT) AS row, CAST(NULL AS BIGINT) AS person_id, "
            "CAST(NULL AS DATE) AS date, '' AS source, '' AS decision, '' AS decided_by, "
            "false AS gillick WHERE false"
        )
    )
    con.execute(f"CREATE OR REPLACE TEMP TABLE {DECISIONS_TABLE} AS {union}")
    for i in range(len(policy.registers)):
        con.execute(f"DROP TABLE consent_raw_{i}")
    return findings
