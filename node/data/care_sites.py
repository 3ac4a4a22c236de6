"""Care sites: the hospital sites a custodian declares public, and the views' `care_site`.

A node publishes a `care_site` column only if node.toml declares which care sites may be
published (`[care_sites] publish = ["RTD", ...]`, their ODS codes: hospital lists are public).
Its domain is then those codes plus "other" (any site not declared, or none recorded) on the
visits view, and plus "none" on the pathway views (a person with no site at all). Nothing in
the domain comes from the data. The rules are in docs/data.md, "Care sites".

Staging maps every care_site_id of the source's care_site table onto its declared code or
"other" (s_site); node/data/views.py joins it to the visits and to each person's usual site.
A query that names care_site on a node without the declaration is refused at planning.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

import duckdb

from node.data.findings import Level, ValidationReport
from node.data.omop import OmopSource, sql_ident, sql_string
from queries.errors import ConfigError, QueryError
from queries.schema import ColumnSpec, ColumnType
from queries.spec import Query

COLUMN: Final = "care_site"
OTHER: Final = "other"
NONE: Final = "none"
# An ODS organisation or site code: letters and digits (trusts have 3, their sites 5).
CODE_PATTERN: Final = re.compile(r"[A-Z0-9]{3,10}")


def check_codes(codes: object, source: str) -> tuple[str, ...]:
    """The declared codes, upper-cased, or ConfigError naming the bad entry."""
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
        raise ConfigError(f"{source}: [care_sites] publish must be a list of ODS codes (strings)")
    out: list[str] = []
    for raw in codes:
        code = raw.strip().upper()
        if not CODE_PATTERN.fullmatch(code):
            raise ConfigError(
                f"{source}: [care_sites] publish: {raw!r} is not an ODS code (3 to 10 letters "
                "or digits, e.g. 'RTD'); list the codes of care_site.care_site_source_value"
            )
        if code in out:
            raise ConfigError(f"{source}: [care_sites] publish lists {code!r} twice")
        out.append(code)
    return tuple(out)


def visit_column(codes: Sequence[str]) -> ColumnSpec:
    """The visits view's care_site: the declared site the visit was at, else other."""
    return ColumnSpec(
        COLUMN,
        ColumnType.CATEGORY,
        "ODS code of the care site of the visit (visit_occurrence.care_site_id), among the "
        "sites the custodian declared public; 'other' for any other site or none recorded",
        (*codes, OTHER),
        person_level=False,
    )


def person_column(codes: Sequence[str]) -> ColumnSpec:
    """A pathway view's care_site: the person's usual site (docs/data.md, "Care sites")."""
    return ColumnSpec(
        COLUMN,
        ColumnType.CATEGORY,
        "the person's usual care site: person.care_site_id, else the site of most of their "
        "visits up to the reference date; declared ODS code, 'other' for an undeclared "
        "site, 'none' for a person with no site at all",
        (*codes, OTHER, NONE),
    )


def refuse_undeclared(query: Query, declared: Sequence[str]) -> None:
    """Refuse (QueryError) a query naming care_site on a node that declares no care sites."""
    if declared:
        return
    named = (
        {*query.group_by}
        | {f.column for f in query.where}
        | {m.column for m in query.measures if m.column is not None}
    )
    if COLUMN in named:
        raise QueryError(
            f"{COLUMN!r} is not published by this node: its custodian has not declared care "
            "sites ([care_sites] publish in node.toml), so no query may group by, filter on "
            "or measure it here"
        )


def stage_sites(
    con: duckdb.DuckDBPyConnection,
    source: OmopSource,
    codes: Sequence[str],
    report: ValidationReport,
) -> None:
    """s_site(care_site_id, site): each source care site's declared code or 'other'."""
    con.execute("CREATE OR REPLACE TEMP TABLE s_site (care_site_id BIGINT, site VARCHAR)")
    if not codes:
        return
    if source.table("care_site") is None:
        report.add(
            Level.WARNING,
            "care_site",
            "care sites are declared in node.toml but the source has no usable care_site "
            "table: every visit's care_site is 'other'",
        )
        return
    listed = ", ".join(sql_string(c) for c in codes)
    con.execute(
        f"""
        INSERT INTO s_site
        SELECT care_site_id,
               CASE WHEN code IN ({listed}) THEN code ELSE '{OTHER}' END
        FROM (SELECT care_site_id, min(upper(trim(care_site_source_value))) AS code
              FROM s_care_site_raw WHERE care_site_id IS NOT NULL GROUP BY 1)
        """  # noqa: S608 - codes are checked ODS codes, quoted
    )
    found = {r[0] for r in con.execute("SELECT DISTINCT site FROM s_site").fetchall()}
    missing = [c for c in codes if c not in found]
    if missing:
        report.add(
            Level.WARNING,
            "care_site.care_site_source_value",
            f"declared care sites {missing} are not in the care_site table: their counts "
            "will be zero; check [care_sites] publish against care_site_source_value",
        )
    report.add(Level.NOTE, "care_site", f"publishing care sites {list(codes)} (others: 'other')")


def person_sites_sql(ref: str) -> str:
    """SQL of (person_id, site) for every person with a site: person.care_site_id's, else
    the site of most of their visits up to `ref` (ties: the one visited first)."""
    return f"""
        WITH own AS (
            SELECT p.person_id, s.site FROM b_person AS p
            JOIN s_site AS s ON s.care_site_id = p.home_site_id
        ),
        visited AS (
            SELECT a.person_id, s.site, count(*) AS n, min(a.start) AS first
            FROM b_acute AS a JOIN s_site AS s ON s.care_site_id = a.site_id
            WHERE a.start <= {ref} GROUP BY 1, 2
        ),
        usual AS (
            SELECT person_id, arg_max(site, n * 1000000 - (first - DATE '1900-01-01')) AS site
            FROM visited GROUP BY 1
        )
        SELECT * FROM own
        UNION ALL
        SELECT u.* FROM usual AS u ANTI JOIN own AS o ON o.person_id = u.person_id
    """  # noqa: S608 - generated


def add_person_sites(con: duckdb.DuckDBPyConnection, views: Sequence[str], ref: str) -> None:
    """Add each pathway view's person-level care_site ('none' for a person without one)."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE b_person_site AS {person_sites_sql(ref)}")
    for name in views:
        view = sql_ident(name)
        con.execute(
            f"""
            CREATE OR REPLACE TABLE {view} AS
            SELECT v.*, coalesce(s.site, '{NONE}') AS {COLUMN}
            FROM {view} AS v LEFT JOIN b_person_site AS s ON s.person_id = v.person_id
            """  # noqa: S608 - the name is a checked identifier, quoted
        )
    con.execute("DROP TABLE b_person_site")
