"""Ad hoc cohorts built on demand in a node's sealed DuckDB, with a bounded cache.

An analyst's cohort (queries/cohort.py) becomes a table exactly like a pathway's view (one
row per consented person, node/data/views.py.build_cohort), built from the inputs the views
kept for it (node/data/cohorts.py.retain_sources). The cache holds the most recently used
MAX_CACHED cohorts of one set of views, keyed by the digest of the canonical definition, so
a repeated cohort is not rebuilt; it belongs to that set of views, so a consent reload
(which builds a new set) starts with an empty cache and no cohort of the old data is served.
A query reads its cohort through a cursor where the reserved view name "cohort" stands for
the cached table, so the plan's SQL (FROM "cohort") runs as planned.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from datetime import date
from typing import Protocol

import duckdb
import pyarrow as pa

from node.data import cohorts, views
from node.data.omop import sql_ident, sql_string
from queries.cohort import COHORT_VIEW, Cohort

log = logging.getLogger(__name__)

# Cohorts kept per set of views. Each is one row per member (at most every person, a few
# dozen bytes a row in DuckDB's columns); the least recently used idle one is dropped first.
MAX_CACHED = 16


class Host(Protocol):
    """The sealed views a cache builds in (node/data/view_set.py's ViewSet)."""

    reference_date: date
    mortality: bool

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor on the views' DuckDB."""
        ...


class _Entry:
    def __init__(self, table: str) -> None:
        self.table = table
        self.users = 0  # queries reading it now; guarded by the cache's lock


class CohortRunner:
    """Runs a plan's SQL with the view name "cohort" standing for one cached cohort."""

    def __init__(self, host: Host, table: str) -> None:
        self._host = host
        self._table = table

    def query(self, sql: str) -> pa.Table:
        """Run one statement on a fresh cursor whose "cohort" is this cohort's table."""
        cursor = self._host.cursor()
        try:
            # Temporary objects are per cursor and found before the main schema.
            cursor.execute(
                f"CREATE TEMP VIEW {COHORT_VIEW} AS SELECT * FROM "  # noqa: S608 - generated
                f"{cohorts.COHORT_SCHEMA}.{sql_ident(self._table)}"
            )
            return cursor.sql(sql).to_arrow_table()
        finally:
            cursor.close()


class CohortCache:
    """The ad hoc cohorts of one set of views, built on first use and kept while used."""

    def __init__(self, host: Host, *, max_entries: int = MAX_CACHED) -> None:
        self._host = host
        self._max = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # guards _entries and their users
        self._building = threading.Lock()  # one build at a time (each uses every thread)
        self.builds = 0  # cohorts built so far (tests check that a repeat is not rebuilt)
        cursor = host.cursor()
        try:
            # Whether descendants can be found: a fact about the source's tables, not patients.
            self.has_ancestor = cohorts.has_ancestor(cursor)
        finally:
            cursor.close()

    def cached(self) -> int:
        """How many cohorts are built and kept now."""
        with self._lock:
            return len(self._entries)

    @contextlib.contextmanager
    def runner(self, cohort: Cohort) -> Iterator[CohortRunner]:
        """The cohort's runner, building the cohort if it is not cached; kept while in use."""
        key = cohort.key()
        entry = self._acquire(key, cohort)
        try:
            yield CohortRunner(self._host, entry.table)
        finally:
            with self._lock:
                entry.users -= 1
            self._evict()

    def _acquire(self, key: str, cohort: Cohort) -> _Entry:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.users += 1
                self._entries.move_to_end(key)
                return entry
        with self._building:
            with self._lock:  # built by another query while this one waited
                entry = self._entries.get(key)
                if entry is not None:
                    entry.users += 1
                    self._entries.move_to_end(key)
                    return entry
            entry = _Entry(f"c_{key[:24]}")
            self._build(cohort, entry.table)
            with self._lock:
                entry.users += 1
                self._entries[key] = entry
                self.builds += 1
        self._evict()
        return entry

    def _build(self, cohort: Cohort, table: str) -> None:
        cursor = self._host.cursor()
        try:
            build_adhoc(
                cursor,
                cohort,
                table,
                self._host.reference_date,
                mortality=self._host.mortality,
                descendants=cohort.descendants and self.has_ancestor,
            )
        except BaseException:
            cursor.execute(f"DROP TABLE IF EXISTS {cohorts.COHORT_SCHEMA}.{sql_ident(table)}")
            raise
        finally:
            cursor.close()

    def _evict(self) -> None:
        """Drop the least recently used idle cohorts beyond the cap (used ones wait)."""
        with self._lock:
            idle = [k for k, e in self._entries.items() if e.users == 0]
            excess = len(self._entries) - self._max
            gone = [self._entries.pop(k).table for k in idle[: max(0, excess)]]
        if not gone:
            return
        cursor = self._host.cursor()
        try:
            for table in gone:
                cursor.execute(f"DROP TABLE IF EXISTS {cohorts.COHORT_SCHEMA}.{sql_ident(table)}")
        finally:
            cursor.close()


def build_adhoc(
    cursor: duckdb.DuckDBPyConnection,
    cohort: Cohort,
    table: str,
    reference_date: date,
    *,
    mortality: bool,
    descendants: bool,
) -> None:
    """Build one ad hoc cohort into COHORT_SCHEMA.table, on a cursor of its own.

    The cursor's temporary views stand in for build_cohort's working tables, so the SQL is
    the pathways' own; `descendants` is False where the source has no concept_ancestor.
    """
    p = cohort.pathway(table)
    for name, kept in cohorts.KEPT.items():
        cursor.execute(
            f"CREATE TEMP VIEW {name} AS SELECT * FROM {cohorts.SOURCE_SCHEMA}.{kept}"  # noqa: S608
        )
    cursor.execute("CREATE TEMP TABLE s_concepts (pathway VARCHAR, concept_id BIGINT)")
    if p.conditions:
        rows = ", ".join(f"({sql_string(p.name)}, {int(c)})" for c in p.conditions)
        cursor.execute(f"INSERT INTO s_concepts VALUES {rows}")  # noqa: S608 - generated
    if p.conditions and descendants:
        listed = ", ".join(str(int(c)) for c in p.conditions)
        cursor.execute(
            f"""
            INSERT INTO s_concepts
            SELECT DISTINCT {sql_string(p.name)}, a.descendant_concept_id
            FROM {cohorts.SOURCE_SCHEMA}.ancestor AS a WHERE a.ancestor_concept_id IN ({listed})
            EXCEPT SELECT pathway, concept_id FROM s_concepts
            """  # noqa: S608 - generated
        )
    views.build_cohort(
        cursor,
        p,
        reference_date,
        mortality=mortality,
        table=f"{cohorts.COHORT_SCHEMA}.{sql_ident(table)}",
    )
    log.info("ad hoc cohort %s built", table)
