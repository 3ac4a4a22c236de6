"""The analyst's own record of what the dashboard ran: a local SQLite file, never shared.

Each entry has a kind: a `query` keeps the SQL as typed, the canonical query (JSON), the
hub's query id, when it ran, its status, the combined result table (Arrow IPC, exactly as the
hub returned it), each node's outcome and, for a secure aggregate, its guarantee, so it
re-opens as the same table and chart; a `model` (a fitted GLM) and a `comparison` (O/E by
unit) keep a description in place of the SQL, the signed model spec, and their result as
JSON (the `--json` of `chc learn glm` and `chc learn compare`), from which the page draws its
table and plot again. Every kind exports
to CSV or Parquet. Whatever failed is kept too, with its message and no result.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from protocols.ledger.entry import (
    SECURE_AGGREGATION_FIELD,
    read_secure_aggregation,
    secure_aggregation_fields,
)
from queries.errors import ConfigError
from queries.present.frames import result_arrow
from queries.results import (
    BudgetStatus,
    FederatedResult,
    NodeOutcome,
    NodeStatus,
    SecureAggregation,
)

STATUS_ERROR = "error"
KIND_QUERY, KIND_MODEL, KIND_COMPARISON = "query", "model", "comparison"
KINDS = (KIND_QUERY, KIND_MODEL, KIND_COMPARISON)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    sql TEXT NOT NULL,
    query_json TEXT NOT NULL,
    query_id TEXT NOT NULL,
    status TEXT NOT NULL,
    message TEXT NOT NULL,
    partial INTEGER NOT NULL,
    result_arrow BLOB,
    nodes_json TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'query',
    result_json TEXT
)
"""
# Columns added after the first stores were written: added to an older file when opened.
_ADDED_COLUMNS = {
    "kind": "kind TEXT NOT NULL DEFAULT 'query'",
    "result_json": "result_json TEXT",
}
_COLUMNS = "id, created, sql, query_json, query_id, status, message, kind"


@dataclass(frozen=True)
class Entry:
    """One query the dashboard ran, and what came back."""

    id: int
    created: str  # UTC, ISO 8601
    sql: str
    query_json: str
    query_id: str
    status: str  # "ok", "partial", "no answer" or "error"
    message: str
    result: FederatedResult | None  # a query's result; None for the other kinds and failures
    kind: str = KIND_QUERY  # query | model | comparison
    # A model's or comparison's result, JSON-ready (None for queries and failures).
    record: dict[str, Any] | None = None

    @property
    def has_result(self) -> bool:
        """Whether there is something to re-open and export."""
        return self.result is not None or self.record is not None


def _status(result: FederatedResult) -> str:
    if not any(o.status is NodeStatus.OK for o in result.nodes):
        return "no answer"
    return "partial" if result.partial else "ok"


def _outcome_to_dict(o: NodeOutcome) -> dict[str, Any]:
    b = o.budget
    return {
        "node": o.node,
        "status": o.status.value,
        "message": o.message,
        "rho_charged": o.rho_charged,
        "noise_variance": o.noise_variance,
        "node_query_id": o.node_query_id,
        "ledger_sequence": o.ledger_sequence,
        "resent": o.resent,
        "charge_unknown": o.charge_unknown,
        "budget": None
        if b is None
        else {
            "rho_total": b.rho_total,
            "rho_spent": b.rho_spent,
            "max_rho_per_query": b.max_rho_per_query,
            "delta": b.delta,
        },
    }


def _outcome_from_dict(d: dict[str, Any]) -> NodeOutcome:
    b = d.get("budget")
    return NodeOutcome(
        node=str(d["node"]),
        status=NodeStatus(d["status"]),
        message=str(d.get("message", "")),
        rho_charged=float(d.get("rho_charged", 0.0)),
        noise_variance=float(d.get("noise_variance", 0.0)),
        budget=None if b is None else BudgetStatus(**{k: float(v) for k, v in b.items()}),
        node_query_id=str(d.get("node_query_id", "")),
        ledger_sequence=int(d.get("ledger_sequence", 0)),
        resent=bool(d.get("resent", False)),
        charge_unknown=bool(d.get("charge_unknown", False)),
    )


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(data: bytes) -> pa.Table:
    with pa.ipc.open_stream(data) as reader:
        return reader.read_all()


class History:
    """The store at `path` (created, with its folder, on first use; readable by its owner)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fresh = not path.exists()
            with self._connect() as con:
                con.execute(_SCHEMA)
                present = {row[1] for row in con.execute("PRAGMA table_info(entries)")}
                for name, ddl in _ADDED_COLUMNS.items():
                    if name not in present:
                        con.execute(f"ALTER TABLE entries ADD COLUMN {ddl}")
            if fresh:
                # Results are the analyst's: not for other users of the machine.
                os.chmod(path, 0o600)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"--history {path}: cannot open the history store ({exc}); give another file"
            ) from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One connection per call: endpoints run in a thread pool, and sqlite3 connections
        # are not to be shared between threads.
        con = sqlite3.connect(self.path, timeout=10.0)
        try:
            with con:
                yield con
        finally:
            con.close()

    def add_result(self, sql: str, query_json: str, result: FederatedResult) -> int:
        """Keep a query that the hub answered; returns the new entry's id."""
        return self._add(
            sql,
            query_json,
            result.query_id,
            _status(result),
            "",
            result.partial,
            _ipc(result.table),
            [_outcome_to_dict(o) for o in result.nodes],
            record_json=_guarantee_json(result.secure_aggregation),
        )

    def add_error(self, sql: str, query_json: str, message: str, *, kind: str = KIND_QUERY) -> int:
        """Keep a query (or model, or comparison) that failed, with its message."""
        return self._add(sql, query_json, "", STATUS_ERROR, message, False, None, [], kind=kind)

    def add_record(
        self,
        kind: str,
        description: str,
        spec_json: str,
        *,
        query_id: str,
        partial: bool,
        record: dict[str, Any],
    ) -> int:
        """Keep a fitted model or a comparison: its description, spec and JSON result."""
        if kind not in (KIND_MODEL, KIND_COMPARISON):
            raise ValueError(f"kind must be {KIND_MODEL} or {KIND_COMPARISON}, not {kind!r}")
        status = "partial" if partial else "ok"
        return self._add(
            description,
            spec_json,
            query_id,
            status,
            "",
            partial,
            None,
            [],
            kind=kind,
            # No NaN in JSON: the records come from to_dict(), which writes nulls instead.
            record_json=json.dumps(record, allow_nan=False),
        )

    def _add(
        self,
        sql: str,
        query_json: str,
        query_id: str,
        status: str,
        message: str,
        partial: bool,
        arrow: bytes | None,
        nodes: list[dict[str, Any]],
        *,
        kind: str = KIND_QUERY,
        record_json: str | None = None,
    ) -> int:
        created = datetime.now(UTC).isoformat(timespec="seconds")
        with self._connect() as con:
            cursor = con.execute(
                "INSERT INTO entries (created, sql, query_json, query_id, status, message, "
                "partial, result_arrow, nodes_json, kind, result_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    created,
                    sql,
                    query_json,
                    query_id,
                    status,
                    message,
                    int(partial),
                    arrow,
                    json.dumps(nodes),
                    kind,
                    record_json,
                ),
            )
            entry_id = cursor.lastrowid
        if entry_id is None:  # an INSERT into a rowid table always sets it
            raise RuntimeError("SQLite did not give the new history entry an id")
        return entry_id

    def entries(self, *, limit: int = 500) -> list[Entry]:
        """The newest entries first, without their result tables."""
        with self._connect() as con:
            rows = con.execute(
                f"SELECT {_COLUMNS} FROM entries ORDER BY id DESC LIMIT ?",  # noqa: S608
                (limit,),
            ).fetchall()
        return [_entry(row, None) for row in rows]

    def get(self, entry_id: int) -> Entry | None:
        """One entry with its result, or None if there is no such entry."""
        with self._connect() as con:
            row = con.execute(
                f"SELECT {_COLUMNS}, partial, result_arrow, nodes_json, result_json "  # noqa: S608
                "FROM entries WHERE id = ?",
                (entry_id,),
            ).fetchone()
        if row is None:
            return None
        *head, partial, arrow, nodes, record_json = row
        result = None
        record = json.loads(record_json) if record_json is not None else None
        if arrow is not None:
            result = FederatedResult(
                query_id=str(head[4]),
                table=_from_ipc(bytes(arrow)),
                nodes=tuple(_outcome_from_dict(d) for d in json.loads(nodes)),
                partial=bool(partial),
                secure_aggregation=read_secure_aggregation(record or {}),
            )
            record = None  # a query's record is its result's guarantee, not a model's
        return _entry(tuple(head), result, record)


def _guarantee_json(guarantee: SecureAggregation | None) -> str | None:
    """A secure aggregate's guarantee as the entry's record (the ledger's own JSON form)."""
    if guarantee is None:
        return None
    return json.dumps({SECURE_AGGREGATION_FIELD: secure_aggregation_fields(guarantee)})


def _entry(
    row: tuple[Any, ...], result: FederatedResult | None, record: dict[str, Any] | None = None
) -> Entry:
    """An Entry from the _COLUMNS of an entries row."""
    entry_id, created, sql, query_json, query_id, status, message, kind = row[:8]
    return Entry(
        id=int(entry_id),
        created=str(created),
        sql=str(sql),
        query_json=str(query_json),
        query_id=str(query_id),
        status=str(status),
        message=str(message),
        result=result,
        kind=str(kind),
        record=record,
    )


def export_table(result: FederatedResult) -> pa.Table:
    """The table an export holds: one row per (region, group..., measure) with its flags.

    The client's frame (FederatedResult.to_arrow): estimate, interval, suppression, partial
    flag, node status and rho spent as columns, the same in CSV, Parquet and a notebook.
    """
    return result_arrow(result)


def entry_table(entry: Entry) -> pa.Table | None:
    """What an entry exports: a query's result frame, a model's coefficient table (one row
    per term, as FitResult.to_arrow), a comparison's units (one row per unit), or None."""
    if entry.result is not None:
        return export_table(entry.result)
    if entry.record is None:
        return None
    if entry.kind == KIND_MODEL:
        return pa.Table.from_pylist(entry.record["fit"]["coefficients"])
    if entry.kind == KIND_COMPARISON:
        return pa.Table.from_pylist(entry.record["comparison"]["units"])
    return None


def to_csv(table: pa.Table) -> bytes:
    """CSV bytes of a table (header line, then one line per row)."""
    sink = io.BytesIO()
    pa_csv.write_csv(table, sink)
    return sink.getvalue()


def to_parquet(table: pa.Table) -> bytes:
    """Parquet bytes of a table."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()
