"""The ledger file: the SQLite schema a node writes and an auditor reads (docs/ledger.md).

Part of the contract, like the entry format: an auditor may be handed a node's ledger file
and must read it exactly as the node wrote it, read-only.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from protocols.ledger.entry import SignedEntry
from queries.errors import ConfigError

SQLITE_MAGIC = b"SQLite format 3\x00"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries ("
    " sequence INTEGER PRIMARY KEY, body BLOB NOT NULL, signature BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS head ("
    " id INTEGER PRIMARY KEY CHECK (id = 1), sequence INTEGER NOT NULL,"
    " body BLOB NOT NULL, signature BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # The release a node sent for each charged envelope, kept until the envelope expires so
    # that a retry after a lost reply is answered with it (never charged again). Not part of
    # the signed chain: a copy of what already left the node, which auditors need not read.
    "CREATE TABLE IF NOT EXISTS releases ("
    " envelope_sha256 BLOB PRIMARY KEY, sequence INTEGER NOT NULL,"
    " expires_at_ms INTEGER NOT NULL, response BLOB NOT NULL)",
    # Defence in depth against mistakes, not against an attacker (who can drop a trigger):
    # the signatures and the chain are what make tampering evident.
    "CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries"
    " BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries"
    " BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END",
)


WAL_RETRY_S = 30.0


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """A connection to a ledger file: read-only, or WAL with synchronous=FULL for writing."""
    if read_only:
        uri = path.resolve().as_uri() + "?mode=ro"
        con = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        con = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        mode = _wal(con)
        if mode is None or str(mode[0]).lower() != "wal":
            con.close()
            raise ConfigError(f"cannot put ledger {path} in WAL mode (is it on a network share?)")
    # FULL: every commit fsyncs the WAL, so a charge survives a crash or power loss.
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=30000")
    return con


def _wal(con: sqlite3.Connection) -> tuple[object, ...] | None:
    """PRAGMA journal_mode=WAL, retried while another process holds the file.

    Switching a new file to WAL takes an exclusive lock, and SQLite may report "database is
    locked" at once rather than call the busy handler (seen with four processes opening one
    new ledger together), so the switch is retried for up to WAL_RETRY_S.
    """
    give_up = time.monotonic() + WAL_RETRY_S
    while True:
        try:
            row: tuple[object, ...] | None = con.execute("PRAGMA journal_mode=WAL").fetchone()
            return row
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= give_up:
                raise
            time.sleep(0.05)


def is_sqlite_file(path: Path) -> bool:
    """Whether a file starts with SQLite's magic header."""
    try:
        with path.open("rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def read_meta(path: Path) -> dict[str, str]:
    """The ledger file's meta table (node name, public key, format), read-only."""
    con = connect(path, read_only=True)
    try:
        return {str(k): str(v) for k, v in con.execute("SELECT key, value FROM meta")}
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"{path} is not a chc ledger: {exc}") from None
    finally:
        con.close()


def read_ledger_file(
    path: Path, from_sequence: int = 1, *, up_to_head: bool = False
) -> Iterator[SignedEntry]:
    """Every stored row in sequence order, then the head, from one read snapshot (lazily).

    With up_to_head, stop at the head's sequence (what a node streams to auditors); without,
    return every row, which is what a verifier of a file wants to see.
    """
    con = connect(path, read_only=True)
    try:
        con.execute("BEGIN")  # one snapshot: the head and the entries agree
        head = con.execute("SELECT sequence, body, signature FROM head WHERE id = 1").fetchone()
        last = int(head[0]) if head is not None and up_to_head else 2**62
        rows = con.execute(
            "SELECT sequence, body, signature FROM entries"
            " WHERE sequence >= ? AND sequence <= ? ORDER BY sequence",
            (from_sequence, last),
        )
        for sequence, body, signature in rows:
            yield SignedEntry(sequence=int(sequence), body=bytes(body), signature=bytes(signature))
        if head is not None:
            yield SignedEntry(
                sequence=int(head[0]), body=bytes(head[1]), signature=bytes(head[2]), head=True
            )
    finally:
        con.close()
