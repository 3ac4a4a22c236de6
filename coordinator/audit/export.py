"""Writing a ledger export, exactly as signed: JSON Lines, or Parquet for analysis.

An export keeps every entry's exact body and signature and the signed head, with a header
naming the node and the key the auditor checked it with, so `chc audit verify` checks it
later just as it checks the node's own file (coordinator/audit/sources.py reads it back).
Writing is separate from reading because only `chc audit export` needs it.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from coordinator.audit.budget import number
from coordinator.audit.sources import EXPORT_MAGIC, LedgerSource
from protocols.ledger.entry import FORMAT, SignedEntry, decode_body


def _export_header(source: LedgerSource) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "node": source.node,
        "source": source.label,
        "public_key": source.public_key.hex() if source.public_key else "",
        "key_origin": source.key_origin,
        "exported_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
    }


def _entry_json(e: SignedEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"sequence": e.sequence}
    try:
        out["body"] = e.body.decode("ascii")
    except UnicodeDecodeError:
        out["body_b64"] = base64.b64encode(e.body).decode("ascii")
    out["signature"] = base64.b64encode(e.signature).decode("ascii")
    return out


def export_jsonl(source: LedgerSource, out: TextIO) -> int:
    """Header line, one line per entry (exact body, base64 signature), then the head."""
    out.write(json.dumps({EXPORT_MAGIC: _export_header(source)}, sort_keys=True) + "\n")
    count = 0
    for e in source.read():
        line = {"head": _entry_json(e)} if e.head else _entry_json(e)
        out.write(json.dumps(line, sort_keys=True) + "\n")
        count += 0 if e.head else 1
    return count


_PARQUET_SCHEMA = pa.schema(
    [
        ("sequence", pa.int64()),
        ("record", pa.string()),  # chc.ledger.entry (a query) or chc.ledger.policy
        ("time", pa.string()),
        ("node", pa.string()),
        ("analyst", pa.string()),
        ("query_id", pa.string()),
        ("outcome", pa.string()),
        ("views", pa.list_(pa.string())),
        ("rho", pa.float64()),
        ("epsilon", pa.float64()),
        ("delta", pa.float64()),
        ("period_start", pa.string()),
        ("code", pa.string()),
        ("reason", pa.string()),
        ("query", pa.string()),
        ("query_sha256", pa.string()),
        ("prev_hash", pa.string()),
        ("body", pa.binary()),
        ("signature", pa.binary()),
    ]
)


def _parquet_row(e: SignedEntry) -> dict[str, Any]:
    try:
        b = decode_body(e.body)
    except ValueError:
        b = {}
    caps = b.get("caps") if isinstance(b.get("caps"), dict) else {}
    views = b.get("views")

    def text(key: str) -> str | None:
        value = b.get(key)
        return value if isinstance(value, str) else None

    return {
        "sequence": e.sequence,
        "record": text("record"),
        "time": text("time"),
        "node": text("node"),
        "analyst": text("analyst"),
        "query_id": text("query_id"),
        "outcome": text("outcome"),
        "views": [str(v) for v in views] if isinstance(views, list) else None,
        "rho": number(b.get("rho")),
        "epsilon": number(b.get("epsilon")),
        "delta": number(b.get("delta")),
        "period_start": caps.get("period_start") if isinstance(caps, dict) else None,
        "code": text("code"),
        "reason": text("reason"),
        "query": text("query"),
        "query_sha256": text("query_sha256"),
        "prev_hash": text("prev_hash"),
        "body": e.body,
        "signature": e.signature,
    }


def export_parquet(source: LedgerSource, path: Path, *, batch: int = 10_000) -> int:
    """One row per entry (parsed columns for analysis, exact body and signature to verify).

    The head goes in the file's metadata, which is written last, so entries stream through.
    """
    header = _export_header(source)
    rows: list[dict[str, Any]] = []
    count = 0
    head: SignedEntry | None = None
    tmp = path.with_name(path.name + ".partial")
    with pq.ParquetWriter(tmp, _PARQUET_SCHEMA) as writer:
        for e in source.read():
            if e.head:
                head = e
                continue
            rows.append(_parquet_row(e))
            count += 1
            if len(rows) >= batch:
                writer.write_table(pa.Table.from_pylist(rows, schema=_PARQUET_SCHEMA))
                rows = []
        if rows or not count:
            writer.write_table(pa.Table.from_pylist(rows, schema=_PARQUET_SCHEMA))
        if head is not None:
            header["head"] = _entry_json(head)
        writer.add_key_value_metadata({EXPORT_MAGIC: json.dumps(header, sort_keys=True)})
    tmp.replace(path)
    return count


def export(source: LedgerSource, path: Path) -> int:
    """Write an export, Parquet if the name ends in .parquet, else JSON Lines."""
    if path.suffix.lower() == ".parquet":
        return export_parquet(source, path)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8") as f:
        count = export_jsonl(source, f)
    tmp.replace(path)
    return count
