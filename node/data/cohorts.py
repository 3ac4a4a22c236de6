"""The custodian's policy on analysts' ad hoc cohorts ([cohorts] in node.toml), and staging.

    [cohorts]
    allow = "listed"               # "none" (the default), "listed" or "any"
    concepts = [255573, 40481087]  # with "listed": the concept ids a cohort may name

The DP guarantee holds whatever cohort an analyst defines (a cohort view has one row per
person, like a pathway's), so the policy is about governance: a data-sharing agreement that
approves only some conditions can say so. The default is "none" so that upgrading a node
never widens what it answers without its custodian deciding to (docs/configuration.md). A
cohort the policy refuses is PERMISSION_DENIED at planning, before anything is charged.

When cohorts are allowed, the node stages the condition records they may need while it reads
the source (`stage_sources`, called by node/data/validate.py): every record with "any", the
listed concepts and their descendants with "listed"; and the rows of concept_ancestor under
those records' concepts, so that a cohort's descendants are found after the source is closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, timedelta

import duckdb

from node.data import catalog as cat
from node.data.omop import OmopSource, sql_string
from node.data.tables import OMOP_TABLES
from queries.cohort import Allow, CohortPolicy
from queries.errors import ConfigError
from queries.pathway import MAX_WINDOW_DAYS

# The keys of [cohorts] (documented in docs/configuration.md).
COHORT_KEYS = frozenset({"allow", "concepts"})
# Staged tables the views keep for ad hoc cohorts (retain_sources).
CONDITIONS_TABLE = "s_cohort_condition"
ANCESTOR_TABLE = "s_cohort_ancestor"
# Ad hoc cohorts are built on demand after the views are sealed (node/data/cohort_cache.py),
# by the pathways' own SQL, from copies of its inputs kept in SOURCE_SCHEMA; the cohorts go
# to COHORT_SCHEMA. Neither schema is a view of the catalog, and SHOW TABLES lists neither.
SOURCE_SCHEMA = "cohort_src"
COHORT_SCHEMA = "cohort_cache"
# The working tables of node/data/views.py.build_cohort, and the kept copies of each.
KEPT: dict[str, str] = {
    "b_person": "person",
    "b_acute": "acute",
    "b_stay": "stay",
    "s_condition": "condition",
}


def parse_cohorts(raw: object, source: str) -> CohortPolicy:
    """Build the policy from node.toml's [cohorts] table (absent: no ad hoc cohorts)."""
    if raw is None:
        return CohortPolicy()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: [cohorts] must be a table")
    unknown = sorted(set(raw) - COHORT_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown [cohorts] key(s) {unknown}; known: {sorted(COHORT_KEYS)}"
        )
    allow = raw.get("allow", Allow.NONE.value)
    if allow not in {a.value for a in Allow}:
        raise ConfigError(
            f"{source}: cohorts.allow must be one of {[a.value for a in Allow]}, got {allow!r}"
        )
    concepts = raw.get("concepts", [])
    if not isinstance(concepts, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in concepts
    ):
        raise ConfigError(f"{source}: cohorts.concepts must be a list of OMOP concept ids")
    try:
        return CohortPolicy(allow=Allow(allow), concepts=tuple(sorted(set(concepts))))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _ints(values: tuple[int, ...]) -> str:
    return ", ".join(str(int(v)) for v in values)


def stage_sources(con: duckdb.DuckDBPyConnection, source: OmopSource, policy: CohortPolicy) -> None:
    """Stage the condition records and concept_ancestor rows ad hoc cohorts may use.

    Nothing with allow = "none". The records of persons the consent rules exclude are staged
    too; every view joins them through the consented persons only, and the views keep only
    consented persons' records (node/data/views.py).
    """
    if not policy.enabled:
        return
    req = next(t for t in OMOP_TABLES if t.name == "condition_occurrence")
    conditions = source.tables["condition_occurrence"]
    ancestor = source.table("concept_ancestor")
    anc_req = next(t for t in OMOP_TABLES if t.name == "concept_ancestor")
    concept = conditions.typed(req.columns[1])
    where = ""
    if policy.allow is Allow.LISTED:
        listed = _ints(policy.concepts)
        where = f"WHERE {concept} IN ({listed})"
        if ancestor is not None:
            anc, desc = (ancestor.typed(c) for c in anc_req.columns)
            where += (
                f" OR {concept} IN (SELECT {desc} FROM {ancestor.relation} "  # noqa: S608
                f"WHERE {anc} IN ({listed}))"
            )
    select = ", ".join(f"{conditions.typed(c)} AS {c.name}" for c in req.columns)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {CONDITIONS_TABLE} AS "  # noqa: S608 - generated
        f"SELECT {select} FROM {conditions.relation} {where}"
    )
    if ancestor is None:
        return
    anc, desc = (ancestor.typed(c) for c in anc_req.columns)
    # Only the rows that can match a staged record: concept_ancestor holds millions of rows,
    # of which a node's conditions need a few per concept present.
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE {ANCESTOR_TABLE} AS
        SELECT DISTINCT {anc} AS ancestor_concept_id, {desc} AS descendant_concept_id
        FROM {ancestor.relation}
        WHERE {desc} IN (SELECT DISTINCT condition_concept_id FROM {CONDITIONS_TABLE})
          AND {anc} IS NOT NULL
        """  # noqa: S608 - generated
    )


def retain_sources(con: duckdb.DuckDBPyConnection, reference_date: date) -> None:
    """Keep what ad hoc cohorts are built from, before the working tables are dropped:
    consented persons, their acute visits in the longest window a cohort may have, their
    condition records (stage_sources) and the staged concept_ancestor rows, if any."""
    first = f"DATE {sql_string((reference_date - timedelta(days=MAX_WINDOW_DAYS - 1)).isoformat())}"
    emergency = _ints(cat.EMERGENCY_CONCEPTS)
    src = SOURCE_SCHEMA
    con.execute(f"CREATE SCHEMA {src}")
    con.execute(f"CREATE SCHEMA {COHORT_SCHEMA}")
    con.execute(f"CREATE TABLE {src}.{KEPT['b_person']} AS SELECT * FROM b_person")  # noqa: S608
    con.execute(
        f"""
        CREATE TABLE {src}.{KEPT["b_acute"]} AS SELECT * FROM b_acute
        WHERE start >= {first} AND (admission = 'emergency' OR concept IN ({emergency}))
        """  # noqa: S608 - generated constants
    )
    con.execute(
        f"CREATE TABLE {src}.{KEPT['b_stay']} AS SELECT s.* FROM b_stay AS s "  # noqa: S608
        f"SEMI JOIN {src}.{KEPT['b_acute']} AS a ON a.id = s.id"
    )
    # Consented persons' records only: nothing of an excluded person outlives the build.
    con.execute(
        f"CREATE TABLE {src}.{KEPT['s_condition']} AS "  # noqa: S608 - generated
        f"SELECT c.* FROM {CONDITIONS_TABLE} AS c "
        "SEMI JOIN b_person AS p ON p.person_id = c.person_id"
    )
    if _exists(con, ANCESTOR_TABLE, temporary=True):
        con.execute(f"CREATE TABLE {src}.ancestor AS SELECT * FROM {ANCESTOR_TABLE}")  # noqa: S608


def _exists(con: duckdb.DuckDBPyConnection, table: str, *, temporary: bool) -> bool:
    # A temporary table's schema is "main" of database "temp"; the kept ones are in ours.
    schema = "temporary" if temporary else f"schema_name = {sql_string(SOURCE_SCHEMA)}"
    rows = con.execute(
        f"SELECT count(*) FROM duckdb_tables() WHERE {schema} AND table_name = ?",  # noqa: S608
        [table],
    ).fetchall()
    return bool(rows[0][0])


def has_ancestor(con: duckdb.DuckDBPyConnection) -> bool:
    """True if the kept sources include concept_ancestor rows (the source had the table)."""
    return _exists(con, "ancestor", temporary=False)
