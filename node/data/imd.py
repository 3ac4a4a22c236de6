"""Deprivation: the Index of Multiple Deprivation (IMD) quintile of a person's area.

OMOP CDM has no deprivation column. The node's convention (docs/data.md): the person's
`location_id` points at a row of the OMOP `location` table whose `location_source_value`
holds the code of the Lower-layer Super Output Area (LSOA) they live in, and the custodian
configures `imd_lookup` in node.toml: a CSV or Parquet file mapping LSOA codes to IMD 2019
quintiles or deciles, as published by MHCLG (File 1 of the English Indices of Deprivation
2019, saved as CSV). Its columns are found by name, without regard to case:

- the LSOA code: a column named `lsoa`, or containing `lsoa` and `code` (e.g. "LSOA code
  (2011)"), or `lsoa11cd` / `lsoa21cd`;
- `imd_quintile` (1-5, 1 = most deprived), or else an IMD decile column (a name containing
  `decile`; quintile = ceil(decile / 2)).

A person without a location, an LSOA code or a match in the lookup is 'unknown'.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from node.data.findings import Finding, Level
from node.data.omop import sql_ident, sql_string

LOOKUP_TABLE = "imd_lookup"


def _lsoa_column(columns: list[str]) -> list[str]:
    lower = {c: c.lower() for c in columns}
    return [
        c
        for c, n in lower.items()
        if n in {"lsoa", "lsoa11cd", "lsoa21cd"} or ("lsoa" in n and "code" in n)
    ]


def load_imd_lookup(con: duckdb.DuckDBPyConnection, path: Path) -> list[Finding]:
    """Create the temporary table imd_lookup(lsoa, quintile) from the custodian's file."""
    where = f"imd_lookup {path}"
    if not path.is_file():
        return [Finding(Level.ERROR, where, "the file does not exist")]
    lower = path.name.lower()
    if lower.endswith(".parquet"):
        relation = f"read_parquet({sql_string(str(path.resolve()))})"
    elif lower.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
        relation = f"read_csv({sql_string(str(path.resolve()))}, header = true, all_varchar = true)"
    else:
        return [Finding(Level.ERROR, where, "expected a .csv or .parquet file")]
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()  # noqa: S608
    except duckdb.Error as exc:
        return [Finding(Level.ERROR, where, f"cannot read it: {str(exc).splitlines()[0]}")]
    columns = [str(r[0]) for r in described]
    lsoa = _lsoa_column(columns)
    quintile = [c for c in columns if "quintile" in c.lower()]
    decile = [c for c in columns if "decile" in c.lower()]
    if len(lsoa) != 1:
        return [
            Finding(
                Level.ERROR,
                where,
                f"expected exactly one LSOA code column (e.g. 'lsoa_code'), found {lsoa} "
                f"among {columns}",
            )
        ]
    value, divide = (quintile, False) if quintile else (decile, True)
    if len(value) != 1:
        return [
            Finding(
                Level.ERROR,
                where,
                f"expected exactly one IMD quintile (or else decile) column, found "
                f"{quintile or decile} among {columns}",
            )
        ]
    number = f"TRY_CAST(TRY_CAST({sql_ident(value[0])} AS DOUBLE) AS BIGINT)"
    top = 10 if divide else 5
    findings: list[Finding] = []
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE imd_raw AS
        SELECT upper(trim(CAST({sql_ident(lsoa[0])} AS VARCHAR))) AS lsoa, {number} AS n
        FROM {relation}
        """  # noqa: S608 - identifiers and the path are quoted
    )
    bad = con.execute(
        f"SELECT count(*) FILTER (WHERE lsoa IS NULL OR lsoa = ''), "  # noqa: S608
        f"count(*) FILTER (WHERE n IS NULL OR n < 1 OR n > {top}), count(*) FROM imd_raw"
    ).fetchall()[0]
    if bad[0]:
        findings.append(Finding(Level.WARNING, where, "rows without an LSOA code, ignored", bad[0]))
    if bad[1]:
        findings.append(
            Finding(
                Level.ERROR,
                where,
                f"{value[0]!r} must be a whole number from 1 to {top}",
                bad[1],
            )
        )
        return findings
    clash = con.execute(
        "SELECT count(*) FROM (SELECT lsoa FROM imd_raw WHERE lsoa <> '' "
        "GROUP BY lsoa HAVING count(DISTINCT n) > 1)"
    ).fetchall()[0][0]
    if clash:
        findings.append(
            Finding(Level.ERROR, where, "LSOA codes listed twice with different values", clash)
        )
        return findings
    quintile_sql = "CAST((n + 1) // 2 AS VARCHAR)" if divide else "CAST(n AS VARCHAR)"
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {LOOKUP_TABLE} AS
        SELECT DISTINCT lsoa, {quintile_sql} AS quintile FROM imd_raw WHERE lsoa <> ''
        """  # noqa: S608 - constant SQL
    )
    con.execute("DROP TABLE imd_raw")
    findings.append(
        Finding(
            Level.NOTE,
            where,
            f"{bad[2]:,} LSOAs read; IMD {'deciles' if divide else 'quintiles'} from "
            f"column {value[0]!r}, codes from {lsoa[0]!r}",
        )
    )
    return findings
