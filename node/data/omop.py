"""Find a custodian's OMOP CDM tables where they are and read them as typed relations.

A source is a DuckDB file (attached READ_ONLY), or a folder holding one Parquet or CSV file
(or a folder of part files) per OMOP table. Table and column names are matched without
regard to case, integers of any width (and decimals or text holding whole numbers) are read
as BIGINT, and dates may be DATE, TIMESTAMP or text (ISO 8601, or DD/MM/YYYY as in many UK
exports). Tables the node does not use are ignored. Nothing is ever written to the source.

Only the columns the node uses are read (OMOP_TABLES, in node/data/tables.py); the rest of a
table is ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import duckdb

from node.data.findings import Finding, Level
from node.data.tables import TABLES_BY_NAME, ColumnReq, Kind
from queries.errors import DataError

_FILE_SUFFIXES: Final = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "csv",
    ".csv.gz": "csv",
    ".tsv.gz": "csv",
}
_DUCKDB_SUFFIXES: Final = {".duckdb", ".db", ".ddb"}
ATTACHED: Final = "omop_source"
_RENAMED: Final = re.compile(r"^(.+)_(\d+)$")
_INT_TYPES: Final = re.compile(r"^(U?(TINY|SMALL|BIG|HUGE)?INT(EGER)?|INT\d+|UHUGEINT)$")


def sql_string(text: str) -> str:
    """An SQL string literal (file paths); doubling the quote is the standard's only escape."""
    return "'" + text.replace("'", "''") + "'"


def sql_ident(name: str) -> str:
    """A quoted SQL identifier (custodians' table and column names may be any text)."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class SourceColumn:
    """A column as the source spells and types it."""

    name: str
    type: str


@dataclass(frozen=True)
class SourceTable:
    """One OMOP table found in the source."""

    name: str  # the OMOP name, lower case
    relation: str  # SQL that reads it: read_parquet(...), read_csv(...) or a qualified name
    origin: str  # where it came from, for the report
    columns: dict[str, SourceColumn]  # lower-case name -> as found

    def has(self, column: str) -> bool:
        """True if the table has this column (any case)."""
        return column in self.columns

    def raw(self, column: str) -> str:
        """The column as stored, NULL-ing the empty and 'NULL' strings of text exports."""
        col = self.columns[column]
        ref = sql_ident(col.name)
        if col.type.upper() == "VARCHAR":
            blank = f"upper(trim({ref})) IN ('', 'NULL', 'NA')"
            return f"(CASE WHEN {blank} THEN NULL ELSE trim({ref}) END)"
        return ref

    def native(self, req: ColumnReq) -> bool:
        """True if the stored type converts to the node's type without a parse step."""
        stored = self.columns[req.name].type.upper()
        if req.kind is Kind.INT:
            return bool(_INT_TYPES.match(stored))
        if req.kind is Kind.DATE:
            return stored == "DATE" or stored.startswith("TIMESTAMP")
        return True

    def typed(self, req: ColumnReq) -> str:
        """SQL reading the column as the node's type; NULL where it cannot be converted."""
        if not self.has(req.name):
            return f"CAST(NULL AS {req.kind.value})"
        raw = self.raw(req.name)
        stored = self.columns[req.name].type.upper()
        if req.kind is Kind.DATE:
            if stored == "DATE":
                return raw
            if stored.startswith("TIMESTAMP"):
                return f"CAST({raw} AS DATE)"
            text = f"CAST({raw} AS VARCHAR)"
            return (
                f"coalesce(TRY_CAST({text} AS DATE), "
                f"CAST(TRY_CAST({text} AS TIMESTAMP) AS DATE), "
                f"CAST(try_strptime({text}, '%d/%m/%Y') AS DATE))"
            )
        if req.kind is Kind.INT and not self.native(req):
            # Whole numbers only: 8507.0 is accepted, 8507.5 is not.
            as_double = f"TRY_CAST({raw} AS DOUBLE)"
            return (
                f"(CASE WHEN {as_double} = floor({as_double}) "
                f"THEN TRY_CAST({as_double} AS BIGINT) END)"
            )
        return f"TRY_CAST({raw} AS {req.kind.value})"


@dataclass
class OmopSource:
    """The OMOP tables of one source, found and described; nothing is read yet."""

    path: Path
    kind: str  # "duckdb" or "files"
    tables: dict[str, SourceTable]
    findings: list[Finding]

    def table(self, name: str) -> SourceTable | None:
        """The named OMOP table, or None if the source lacks it."""
        return self.tables.get(name)


def _strip_suffix(name: str) -> tuple[str, str] | None:
    lower = name.lower()
    for suffix in sorted(_FILE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)], _FILE_SUFFIXES[suffix]
    return None


def _reader(fmt: str, target: str) -> str:
    if fmt == "parquet":
        return f"read_parquet({sql_string(target)})"
    # Every field as text: the node converts the columns it needs and counts what fails,
    # rather than trusting a type guessed from a sample. The header row is detected, not
    # assumed: a header-less export then has columns column0, column1, ... and the report
    # says so, instead of naming columns after the first patient's values.
    return f"read_csv({sql_string(target)}, all_varchar = true)"


def _folder_candidates(folder: Path) -> dict[str, list[tuple[str, str]]]:
    """OMOP table name -> [(origin, reader SQL)] for every file or part folder found."""
    found: dict[str, list[tuple[str, str]]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            # Part files of one table, e.g. a Spark export person/part-0000.parquet.
            suffixes = {
                f.name[len(split[0]) :]
                for f in entry.iterdir()
                if f.is_file() and (split := _strip_suffix(f.name)) is not None
            }
            if len(suffixes) == 1:
                suffix = suffixes.pop()
                fmt = _FILE_SUFFIXES[suffix.lower()]
                target = str(entry.resolve() / f"*{suffix}")
                found.setdefault(entry.name.lower(), []).append(
                    (f"{entry}/*{suffix}", _reader(fmt, target))
                )
            continue
        split = _strip_suffix(entry.name)
        if split is not None:
            stem, fmt = split
            found.setdefault(stem.lower(), []).append(
                (str(entry), _reader(fmt, str(entry.resolve())))
            )
    return found


def unreadable(name: str, origin: str, exc: BaseException) -> Finding:
    """A table that cannot be read: refused if the node needs it, else served as absent."""
    req = TABLES_BY_NAME[name]
    if req.required:
        return Finding(Level.ERROR, name, f"cannot read {origin}: {_first(exc)}")
    return Finding(Level.WARNING, name, f"cannot read {origin} ({_first(exc)}): {req.if_absent}")


def _describe(con: duckdb.DuckDBPyConnection, relation: str) -> list[tuple[str, str]]:
    rows = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()  # noqa: S608 - quoted
    return [(str(r[0]), str(r[1])) for r in rows]


def _columns(
    name: str, described: list[tuple[str, str]], findings: list[Finding]
) -> dict[str, SourceColumn]:
    columns: dict[str, SourceColumn] = {}
    for col_name, col_type in described:
        key = col_name.lower()
        # DuckDB renames the second of two columns that differ only in case to NAME_1.
        renamed = _RENAMED.match(key)
        twin = renamed.group(1) if renamed else key
        if key in columns or (renamed and twin in columns):
            findings.append(
                Finding(
                    Level.ERROR,
                    f"{name}.{twin}",
                    f"two columns differ only in case ({columns[twin].name!r} and another, "
                    f"read as {col_name!r}); keep one",
                )
            )
            continue
        columns[key] = SourceColumn(col_name, col_type)
    return columns


def _open_folder(con: duckdb.DuckDBPyConnection, folder: Path) -> OmopSource:
    findings: list[Finding] = []
    tables: dict[str, SourceTable] = {}
    candidates = _folder_candidates(folder)
    ignored = sorted(n for n in candidates if n not in TABLES_BY_NAME)
    if ignored:
        findings.append(
            Finding(Level.NOTE, str(folder), f"tables the node does not use, ignored: {ignored}")
        )
    for name, found in candidates.items():
        if name not in TABLES_BY_NAME:
            continue
        if len(found) > 1:
            findings.append(
                Finding(
                    Level.ERROR,
                    name,
                    f"several files hold this table ({', '.join(o for o, _ in found)}); keep one",
                )
            )
            continue
        origin, relation = found[0]
        try:
            described = _describe(con, relation)
        except duckdb.Error as exc:
            findings.append(unreadable(name, origin, exc))
            continue
        columns = _columns(name, described, findings)
        tables[name] = SourceTable(name, relation, origin, columns)
    return OmopSource(folder, "files", tables, findings)


def _open_duckdb(con: duckdb.DuckDBPyConnection, path: Path, schema: str | None) -> OmopSource:
    try:
        con.execute(f"ATTACH {sql_string(str(path.resolve()))} AS {ATTACHED} (READ_ONLY)")
    except duckdb.Error as exc:
        raise DataError(
            f"cannot open {path} as a DuckDB database read-only: {_first(exc)} (is another "
            "process writing to it, or was it written by a newer DuckDB?)"
        ) from None
    rows = con.execute(
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_catalog = ? ORDER BY table_schema, table_name",
        [ATTACHED],
    ).fetchall()
    by_schema: dict[str, dict[str, str]] = {}
    for table_schema, table_name in rows:
        by_schema.setdefault(str(table_schema), {})[str(table_name).lower()] = str(table_name)
    findings: list[Finding] = []
    if schema is not None:
        chosen = next((s for s in by_schema if s.lower() == schema.lower()), None)
        if chosen is None:
            raise DataError(f"{path} has no schema {schema!r}; it has {sorted(by_schema)}")
    else:
        with_person = [s for s, t in by_schema.items() if "person" in t]
        if len(with_person) > 1:
            raise DataError(
                f"{path} has a person table in several schemas ({with_person}); say which "
                "holds the OMOP CDM with omop_schema in node.toml"
            )
        chosen = with_person[0] if with_person else ("main" if "main" in by_schema else None)
    names = by_schema.get(chosen, {}) if chosen is not None else {}
    ignored = sorted(n for n in names if n not in TABLES_BY_NAME)
    if ignored:
        findings.append(
            Finding(Level.NOTE, f"{path}:{chosen}", f"tables the node does not use: {ignored}")
        )
    tables: dict[str, SourceTable] = {}
    for lower, actual in names.items():
        if lower not in TABLES_BY_NAME:
            continue
        relation = f"{ATTACHED}.{sql_ident(str(chosen))}.{sql_ident(actual)}"
        try:
            described = _describe(con, relation)
        except duckdb.Error as exc:
            findings.append(unreadable(lower, actual, exc))
            continue
        columns = _columns(lower, described, findings)
        tables[lower] = SourceTable(lower, relation, f"{path}:{chosen}.{actual}", columns)
    return OmopSource(path, "duckdb", tables, findings)


def open_source(
    con: duckdb.DuckDBPyConnection, path: Path, *, schema: str | None = None
) -> OmopSource:
    """Find the OMOP tables of a DuckDB file or a Parquet/CSV folder; raise DataError if none."""
    if path.is_dir():
        if schema is not None:
            raise DataError("omop_schema applies to a DuckDB file, not to a folder of files")
        return _open_folder(con, path)
    if path.is_file():
        if _strip_suffix(path.name) is not None:
            raise DataError(
                f"{path} is a single file: point the node at the folder that holds one file "
                "per OMOP table (person.parquet, visit_occurrence.parquet, ...)"
            )
        if path.suffix.lower() not in _DUCKDB_SUFFIXES:
            raise DataError(f"{path} is not a DuckDB file (.duckdb, .db or .ddb)")
        return _open_duckdb(con, path, schema)
    raise DataError(
        f"OMOP source {path} is neither a folder of Parquet/CSV files nor a DuckDB file"
    )


def _first(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
