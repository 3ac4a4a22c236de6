"""DuckDB over a node's OMOP CDM: source tables read in place, analysis views built once.

At start the store checks and stages the OMOP tables it needs (node/validate.py), applies
opt-outs and children's consent (node/consent.py), and builds the analysis views in memory
(node/views.py). It then detaches the source, drops every working table and locks DuckDB
down, so queries see only the views of the catalog (node/catalog.py) and can read no file.
The source is never written to: files are only read and a DuckDB file is attached READ_ONLY.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa

from node import views
from node.catalog import DEFAULT_REFERENCE_DATE
from node.consent import ConsentPolicy
from node.findings import ValidationReport
from node.omop import ATTACHED
from node.policy import NodeConfig
from node.validate import DataSettings, prepare
from protocols.errors import DataError
from queries.pathway import Pathway, load_pathways

log = logging.getLogger(__name__)


def node_pathways(cfg: NodeConfig) -> list[Pathway]:
    """The pathways a node serves: node.toml's list (default all) from the library and
    the custodian's pathways_dir."""
    names = list(cfg.pathways) if cfg.pathways is not None else None
    return load_pathways(names, cfg.pathways_dir)


class OmopStore:
    """A node's data: an in-memory DuckDB holding the analysis views and nothing else."""

    def __init__(
        self,
        source: Path,
        pathways: Sequence[Pathway],
        *,
        reference_date: date = DEFAULT_REFERENCE_DATE,
        threads: int = 2,
        imd_lookup: Path | None = None,
        consent: ConsentPolicy | None = None,
        omop_schema: str | None = None,
    ) -> None:
        started = time.perf_counter()
        self.settings = DataSettings(
            omop=source,
            reference_date=reference_date,
            imd_lookup=imd_lookup,
            consent=consent if consent is not None else ConsentPolicy(),
            omop_schema=omop_schema,
        )
        self.pathways = tuple(pathways)
        self._con = duckdb.connect(":memory:", config={"threads": threads})
        self._lock = threading.Lock()
        try:
            self.report: ValidationReport = prepare(self._con, self.settings, self.pathways)
            self.report.raise_if_refused()
            views.build_views(self._con, self.pathways, reference_date)
            self._seal()
        except duckdb.Error as exc:
            self._con.close()
            raise DataError(f"could not build analysis views from {source}: {exc}") from None
        except BaseException:
            self._con.close()
            raise
        for finding in self.report.warnings:
            log.warning("data: %s", finding.render())
        self.build_seconds = time.perf_counter() - started
        log.info("analysis views built in %.2f s", self.build_seconds)

    @classmethod
    def from_config(cls, cfg: NodeConfig, *, threads: int = 2) -> OmopStore:
        """The store node.toml describes (raises DataError with the report if refused)."""
        return cls(
            cfg.omop,
            node_pathways(cfg),
            reference_date=cfg.reference_date,
            threads=threads,
            imd_lookup=cfg.imd_lookup,
            consent=cfg.consent,
            omop_schema=cfg.omop_schema,
        )

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

    def tables(self) -> list[str]:
        """Names of the views queries can see."""
        return sorted(r["name"] for r in self.query("SHOW TABLES").to_pylist())

    def query(self, sql: str) -> pa.Table:
        """Run one read-only aggregate on a fresh cursor and return it as Arrow."""
        # A cursor per call: DuckDB connections are not safe to share between threads.
        with self._lock:
            cursor = self._con.cursor()
        try:
            return cursor.sql(sql).to_arrow_table()
        finally:
            cursor.close()

    def close(self) -> None:
        """Release DuckDB's resources."""
        self._con.close()
