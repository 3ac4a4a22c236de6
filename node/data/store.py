"""DuckDB over a node's OMOP CDM: source tables read in place, analysis views rebuilt when
the consent registers change.

At start the store checks and stages the OMOP tables it needs (node/data/validate.py), applies
opt-outs and children's consent (node/data/consent.py), and builds the analysis views in memory
(node/data/views.py). It then detaches the source, drops every working table and locks DuckDB
down, so queries see only the views of the catalog (node/data/catalog.py) and can read no file.
The source is never written to: files are only read and a DuckDB file is attached READ_ONLY.

A running store watches its consent registers: a stat of each file every few seconds, and a
content hash only when the stat changed. A sealed DuckDB cannot read files again, so on a
change the store builds a complete new set of views in a DuckDB of its own, from the source
and the registers as they are now, while queries go on being answered from the old views;
it then switches to the new views in one step and frees the old ones once the queries still
running on them finish. If a changed register is invalid, or the rebuild fails, the store
refuses every query (DataError, FAILED_PRECONDITION) until a rebuild succeeds: the old
views would count persons who have opted out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import date
from pathlib import Path

import pyarrow as pa

from node.config import NodeConfig
from node.data import consent
from node.data.catalog import build_catalog
from node.data.consent import ConsentPolicy, RegisterState
from node.data.findings import Finding, Level
from node.data.validate import DataSettings
from node.data.view_set import ViewSet
from queries.cohort import CohortPolicy
from queries.errors import DataError
from queries.pathway import Pathway, load_pathways
from queries.schema import Catalog

log = logging.getLogger(__name__)

# How often a running store looks at its consent registers (a stat per file), and how long
# it waits before retrying a rebuild that failed for a reason other than a register's
# content (an unreadable source, say), which no change of a register would bring about.
RECHECK_S = 2.0
RETRY_S = 60.0
# Rebuilds in a row that a register changed under before queries are refused instead.
UNSTABLE_READS = 3


def node_pathways(cfg: NodeConfig) -> list[Pathway]:
    """The pathways a node serves: node.toml's list (default all) from the library and
    the custodian's pathways_dir."""
    names = list(cfg.pathways) if cfg.pathways is not None else None
    return load_pathways(names, cfg.pathways_dir)


class OmopStore:
    """A node's data: analysis views in memory, rebuilt and switched when consent changes."""

    def __init__(
        self,
        source: Path,
        pathways: Sequence[Pathway],
        *,
        reference_date: date | None = None,
        threads: int = 2,
        imd_lookup: Path | None = None,
        consent: ConsentPolicy | None = None,
        omop_schema: str | None = None,
        recheck_s: float | None = RECHECK_S,
        cohorts: CohortPolicy | None = None,
        care_sites: Sequence[str] = (),
    ) -> None:
        self.settings = DataSettings(
            omop=source,
            reference_date=reference_date,
            imd_lookup=imd_lookup,
            consent=consent if consent is not None else ConsentPolicy(),
            omop_schema=omop_schema,
            cohorts=cohorts if cohorts is not None else CohortPolicy(),
            care_sites=tuple(care_sites),
        )
        self.pathways = tuple(pathways)
        # A rebuild uses as many threads as the start did: queries on the old views are
        # short and interleave with it, and the sooner it ends the sooner opt-outs apply.
        self._threads = threads
        self._lock = threading.Lock()  # guards _views, _refusal and the views' users
        self._reload = threading.Lock()  # one rebuild at a time
        self._stop = threading.Event()
        # Taken before the registers are read, so a change during the build is seen later.
        self._seen = _states(self.settings)
        first = ViewSet(self.settings, self.pathways, threads)  # raises: the node won't start
        self._views: ViewSet | None = first
        self._refusal: str | None = None
        self._retry_at: float | None = None
        self._unstable = 0  # rebuilds in a row during which a register changed
        self.report = first.report
        # Fixed from the first build on: a rebuild (consent changed) must serve the catalog
        # published at start, even if the data's end has moved since.
        self.reference_date, self.mortality = first.reference_date, first.mortality
        self.settings = dataclasses.replace(self.settings, reference_date=self.reference_date)
        self.build_seconds = first.build_seconds
        self.generation = 1  # how many sets of views have been served
        self.rebuilding = False
        for finding in first.report.warnings:
            log.warning("data: %s", finding.render())
        log.info("analysis views built in %.2f s", self.build_seconds)
        self._watcher: threading.Thread | None = None
        if self.settings.consent.registers and recheck_s is not None:
            self._watcher = threading.Thread(
                target=self._watch, args=(recheck_s,), name="chc-consent-watch", daemon=True
            )
            self._watcher.start()

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
            cohorts=cfg.cohorts,
            care_sites=cfg.care_sites,
        )

    @property
    def concept_ancestor(self) -> bool:
        """Whether ad hoc cohorts' descendants can be found (the source has concept_ancestor)."""
        with self._lock:
            current = self._views
        return current is not None and current.cohorts is not None and current.cohorts.has_ancestor

    @property
    def refusal(self) -> str | None:
        """Why queries are refused now (a register changed and the views could not follow)."""
        return self._refusal

    def catalog(self) -> Catalog:
        """The public catalog of the views this store serves (its reference date, and the
        mortality columns only if the source has a usable death table)."""
        return build_catalog(
            self.pathways,
            reference_date=self.reference_date,
            mortality=self.mortality,
            care_sites=self.settings.care_sites,
        )

    def tables(self) -> list[str]:
        """Names of the views queries can see."""
        return sorted(r["name"] for r in self.query("SHOW TABLES").to_pylist())

    def query(self, sql: str) -> pa.Table:
        """Run one read-only aggregate on the current views and return it as Arrow."""
        with self.snapshot() as views:
            return views.query(sql)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[ViewSet]:
        """One set of views for several statements, so that one release never mixes the
        views from before and after a consent reload."""
        with self._lock:
            current = self._views
            if current is None:
                raise DataError(self._refusal or "the node's data store is closed")
            current.users += 1
        try:
            yield current
        finally:
            self._release(current)

    def _release(self, used: ViewSet) -> None:
        with self._lock:
            used.users -= 1
            done = used.retired and used.users == 0
        if done:
            used.close()

    def _replace(self, new: ViewSet | None, refusal: str | None) -> None:
        """Serve new (or, with None, refuse queries with refusal); free the old views."""
        with self._lock:
            old, self._views, self._refusal = self._views, new, refusal
            if old is not None:
                old.retired = True
            done = old is not None and old.users == 0
        if done and old is not None:
            old.close()  # else the last query running on them closes them

    def reload_if_changed(self) -> bool:
        """Rebuild and switch the views if a consent register changed; True if it tried."""
        with self._reload:
            states = _states(self.settings, self._seen)
            changed = [
                s.path for s, t in zip(states, self._seen, strict=True) if s.content != t.content
            ]
            retry = self._retry_at is not None and time.monotonic() >= self._retry_at
            if not changed and not retry:
                self._seen = states  # the same content (touched, copied over): keep the stat
                return False
            if self._stop.is_set():
                return False
            self._rebuild(states, changed)
            return True

    def _rebuild(self, states: tuple[RegisterState, ...], changed: list[Path]) -> None:
        what = ", ".join(str(p) for p in changed) or "unchanged since the last failure"
        log.info("consent register(s) changed (%s): rebuilding the analysis views", what)
        new: ViewSet | None = None
        errors: list[Finding] = []
        failure: str | None = None
        self.rebuilding = True
        try:
            # The registers alone first (milliseconds): a bad one refuses queries at once,
            # not after a full rebuild.
            errors = [
                f for f in consent.check_registers(self.settings.consent) if f.level is Level.ERROR
            ]
            if not errors:
                new = ViewSet(self.settings, self.pathways, self._threads, mortality=self.mortality)
        except DataError as exc:
            failure = str(exc)
        except Exception as exc:  # any failure must refuse queries, never crash the watch
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            self.rebuilding = False
        after = _states(self.settings, states)
        if [s.content for s in after] != [s.content for s in states]:
            # Changed while it was being read, so what was read may be half a file: read it
            # again at the next check (self._seen still holds the state before this one).
            if new is not None:
                new.close()
            self._unstable += 1
            log.warning("a consent register changed while it was being read; reading it again")
            if self._unstable >= UNSTABLE_READS:
                # Never applying the new decisions would serve the old views for ever.
                self._refuse(
                    f"a consent register changed while it was being read {self._unstable} "
                    "times in a row; replace it in one step (write a temporary file, then "
                    "rename it over the register)",
                    ", ".join(str(p) for p in changed),
                )
            return
        self._unstable = 0
        self._seen = after
        if new is not None:
            self._switch(new)
        elif errors:
            self._retry_at = None  # only a change of the register can fix it
            problems: dict[str, list[str]] = {}
            for f in errors:
                problems.setdefault(f.where, []).append(f.message)
            self._refuse(
                "; ".join(f"{where} is invalid: {'; '.join(m)}" for where, m in problems.items()),
                "\n".join(f.render() for f in errors),
            )
        else:
            self._retry_at = time.monotonic() + RETRY_S
            self._refuse(
                "a consent register changed and the analysis views could not be rebuilt from "
                "the node's OMOP data",
                f"{failure} (retrying every {RETRY_S:g} s and whenever a register changes)",
            )

    def _switch(self, new: ViewSet) -> None:
        if self._stop.is_set():
            new.close()
            return
        self._retry_at = None
        self.report, self.build_seconds = new.report, new.build_seconds
        self._replace(new, None)
        self.generation += 1
        for finding in new.report.warnings:
            log.warning("data: %s", finding.render())
        counts = next((f.message for f in new.report.findings if f.where == "consent"), "")
        log.info(
            "consent registers re-read: new analysis views built in %.2f s and now served (%s)",
            new.build_seconds,
            counts,
        )

    def _refuse(self, problem: str, details: str) -> None:
        # `problem` goes to analysts in the refusal, so it names files and checks only; the
        # rows and values (`details`) are for the custodian's log.
        refusal = (
            f"{problem}. Until this is fixed the node refuses every query: its views from "
            "before the change would count persons who have opted out (the node's custodian "
            "has the details in its log)"
        )
        if self._stop.is_set():
            return
        self._replace(None, refusal)
        log.error(
            "REFUSING ALL QUERIES: %s. Fix it; the node re-reads its registers when they "
            "change:\n%s",
            problem,
            details,
        )

    def _watch(self, recheck_s: float) -> None:
        while not self._stop.wait(recheck_s):
            try:
                self.reload_if_changed()
            except Exception:  # the opt-outs can no longer be followed: refuse queries
                log.exception("the consent register watch failed")
                self._replace(
                    None,
                    "the node could not check its consent registers, so it refuses every "
                    "query (the node's custodian has the details in its log)",
                )

    def close(self) -> None:
        """Stop watching the registers and release DuckDB's resources."""
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
        self._replace(None, "the node's data store is closed")


def _states(
    settings: DataSettings, previous: Sequence[RegisterState] = ()
) -> tuple[RegisterState, ...]:
    return consent.register_states(settings.consent.registers, previous)
