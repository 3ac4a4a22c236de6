"""One complete set of a node's analysis views, in a sealed in-memory DuckDB.

The store (node/data/store.py) keeps one ViewSet at a time and builds a new one when the
consent registers change; a ViewSet is what a query runs on, and it owns the ad hoc cohorts
built from it (node/data/cohort_cache.py), so a rebuild starts with none.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from datetime import date

import duckdb
import pyarrow as pa

from node.data import views
from node.data.cohort_cache import CohortCache, CohortRunner
from node.data.findings import ValidationReport
from node.data.omop import ATTACHED
from node.data.validate import DataSettings, prepare
from queries.errors import DataError
from queries.pathway import Pathway
from queries.spec import Query


class ViewSet:
    """One complete set of analysis views in a sealed in-memory DuckDB."""

    def __init__(
        self,
        settings: DataSettings,
        pathways: tuple[Pathway, ...],
        threads: int,
        *,
        mortality: bool | None = None,
    ) -> None:
        started = time.perf_counter()
        self._con = duckdb.connect(":memory:", config={"threads": threads})
        self._lock = threading.Lock()
        self.users = 0  # queries running on these views; guarded by the store's lock
        self.retired = False  # replaced: close once the last query on them finishes
        try:
            self.report: ValidationReport = prepare(self._con, settings, pathways)
            self.report.raise_if_refused()
            # The date prepare used: node.toml's, or the end of the data (node/data/reference.py).
            self.reference_date = _used_date(self.report)
            self.mortality = "death" not in self.report.absent
            if mortality is not None:  # a rebuild serves the catalog published at start
                if mortality and not self.mortality:
                    raise DataError(
                        "the death table was usable when the node started and is not now: "
                        "restore it, or restart the node to serve without mortality columns"
                    )
                self.mortality = mortality
            views.build_views(
                self._con,
                pathways,
                self.reference_date,
                mortality=self.mortality,
                keep_cohort_sources=settings.cohorts.enabled,
                care_sites=bool(settings.care_sites),
            )
            self._seal()
            # Ad hoc cohorts of these views only: a rebuild (consent reload) starts afresh.
            self.cohorts = CohortCache(self) if settings.cohorts.enabled else None
        except duckdb.Error as exc:
            self._con.close()
            raise DataError(f"could not build analysis views from {settings.omop}: {exc}") from None
        except BaseException:
            self._con.close()
            raise
        self.build_seconds = time.perf_counter() - started

    def _seal(self) -> None:
        """Drop everything but the views, detach the source and forbid any file access."""
        con = self._con
        temps = con.execute("SELECT table_name FROM duckdb_tables() WHERE temporary").fetchall()
        for (name,) in temps:
            con.execute(f'DROP TABLE temp."{name}"')
        attached = {
            r[0] for r in con.execute("SELECT database_name FROM duckdb_databases()").fetchall()
        }
        if ATTACHED in attached:
            con.execute(f"DETACH {ATTACHED}")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")

    def query(self, sql: str) -> pa.Table:
        """Run one statement on a fresh cursor."""
        # A cursor per call: DuckDB connections are not safe to share between threads.
        with self._lock:
            cursor = self._con.cursor()
        try:
            return cursor.sql(sql).to_arrow_table()
        finally:
            cursor.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor (DuckDB connections are not safe to share between threads)."""
        with self._lock:
            return self._con.cursor()

    def close(self) -> None:
        """Release DuckDB's memory."""
        self._con.close()


def _used_date(report: ValidationReport) -> date:
    if report.reference_date is None:  # prepare sets it before any view can be built
        raise DataError(f"no reference date was found for {report.source}")
    return report.reference_date


@contextlib.contextmanager
def cohort_runner(views: ViewSet, query: Query) -> Iterator[ViewSet | CohortRunner]:
    """What a query's plan runs on: the views, or its ad hoc cohort (built if not cached)."""
    if query.cohort is None:
        yield views
        return
    if views.cohorts is None:  # the service refuses such a query first, from the policy
        raise DataError("this node's views keep nothing for ad hoc cohorts")
    with views.cohorts.runner(query.cohort) as runner:
        yield runner
