"""The node's privacy ledger: append-only, hash-chained, Ed25519-signed, in SQLite.

Every query a node answers or refuses becomes one entry. An entry's body is canonical JSON
(sorted keys, compact separators, ASCII) holding who asked (the analyst and the signed
envelope itself), what exactly (the canonical query and its SHA-256), what it cost (rho, the
(epsilon, delta) equivalent), the outcome, the caps in force and the spend they were checked
against, and the SHA-256 of the previous entry (body + signature). The node signs each body
with its ledger key. A signed *head* (the last sequence number and its hash) is rewritten in
the same transaction as every append, so deleting entries at the end is detected too.

The caps in force are the ledger's own: a signed *policy* entry (protocols/budget/changes.py)
records the whole budget policy whenever the node opens the ledger with a new one.

Charge before release (docs/ledger.md): `charge()` checks every cap and appends inside one
`BEGIN IMMEDIATE` transaction, under a process lock, and returns only once SQLite has
committed with `synchronous=FULL` (the WAL is fsync'd). Budgets are sums of the entries (in
the current period, and since the ledger began), never a separate counter: `LedgerBook` folds
entries as they are read, and every process catches up on what others appended first.

The entry format (protocols/ledger/entry.py) and the file's schema (protocols/ledger/file.py)
are the contract with auditors, documented in docs/ledger.md; coordinator/audit/ verifies
them. The book-keeping is node/budget/book.py.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from node.budget.accounting import Accountant, Charge, Keep, Kept, LedgerWriteError, Refusal
from node.budget.book import LedgerBook
from node.budget.keys import load_or_create_key
from protocols.budget.policy import BudgetPolicy
from protocols.ledger.entry import (
    FORMAT,
    SignedEntry,
    decode_body,
    default_key_path,
    format_time,
    public_key_bytes,
    signature_ok,
)
from protocols.ledger.file import SCHEMA, connect, read_ledger_file
from protocols.observability.metrics import ledger_append_timer
from protocols.security.envelope import now_ms
from queries.errors import ConfigError, LedgerIntegrityError
from queries.results import BudgetStatus

# How many of the last entries have their signatures checked when a node opens its ledger (all
# hash links are always checked; `chc audit verify` checks every signature).
TAIL_SIGNATURES = 64
# What SqliteLedger._write builds: an entry, or (for a policy already recorded) nothing.
_Built = TypeVar("_Built", bound=SignedEntry | None)
log = logging.getLogger(__name__)


class SqliteLedger(Accountant):
    """The production ledger: one SQLite file per node, WAL, synchronous=FULL."""

    def __init__(
        self,
        path: Path,
        *,
        node: str,
        policy: BudgetPolicy,
        key_path: Path | None = None,
        clock: Callable[[], datetime] | None = None,
        override: str | None = None,
        record_policy: bool = True,
    ) -> None:
        """Open (or create) the ledger, verify it, and record `policy` if it is new.

        `override` is the custodian's reason for a policy that loosens the recorded one
        (without it, such a policy raises ConfigError). With record_policy=False the ledger
        is only checked (`chc-node check`): policy_change says what opening it would record,
        and nothing can be written.
        """
        super().__init__(policy, clock=clock)
        self.path = path
        self.key_path = key_path if key_path is not None else default_key_path(path)
        if path.is_symlink():
            raise ConfigError(f"ledger {path} is a symbolic link; give the real path")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._con = connect(path)
        self._read_only = False
        try:
            self._book = self._open(node)
            if record_policy:
                self._write(lambda when: self._policy_entry(override, when))
            else:
                self.policy_change = self._book.plan_policy(policy, override)
                self._read_only = True
        except BaseException:
            self._con.close()
            raise
        if self.policy_change is not None and record_policy:
            level = logging.WARNING if self.policy_change.loosened else logging.INFO
            log.log(
                level,
                "ledger %s: policy entry %d %s",
                path,
                self._book.policy_entry,
                self.policy_change.describe(),
            )

    # opening ----------------------------------------------------------------------------

    def _open(self, node: str) -> LedgerBook:
        con = self._con
        con.execute("BEGIN IMMEDIATE")
        try:
            for statement in SCHEMA:
                con.execute(statement)
            meta = {str(k): str(v) for k, v in con.execute("SELECT key, value FROM meta")}
            if meta.get("node", node) != node:
                raise ConfigError(
                    f"ledger {self.path} belongs to node {meta['node']!r}, not {node!r}"
                )
            if "public_key" in meta and not self.key_path.exists():
                raise LedgerIntegrityError(
                    f"ledger {self.path} was signed with a key that is no longer at "
                    f"{self.key_path}; restore that key file (a new key cannot extend the chain)"
                )
            key = load_or_create_key(self.key_path)
            public = public_key_bytes(key).hex()
            if "public_key" not in meta:
                con.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [
                        ("format", str(FORMAT)),
                        ("node", node),
                        ("public_key", public),
                        ("created", format_time(self.clock())),
                    ],
                )
                # An empty ledger has a signed head too (entry 0, the zero hash), so that an
                # auditor can tell an empty ledger from one whose entries were all deleted.
                head = LedgerBook(node=node, policy=self.configured_policy, key=key).head()
                con.execute(
                    "INSERT OR REPLACE INTO head (id, sequence, body, signature)"
                    " VALUES (1, ?, ?, ?)",
                    (head.sequence, head.body, head.signature),
                )
            elif meta["public_key"] != public:
                raise LedgerIntegrityError(
                    f"ledger {self.path} was signed by key {meta['public_key'][:16]}... but "
                    f"{self.key_path} holds key {public[:16]}...: wrong key file"
                )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        book = LedgerBook(node=node, policy=self.configured_policy, key=key)
        try:
            self._load(book)
        except LedgerIntegrityError as exc:
            raise LedgerIntegrityError(
                f"the privacy ledger {self.path} does not verify, so the node will not start: "
                f"{exc}. Run `chc audit verify {self.path}` for a full report; restore the "
                "ledger from a backup or investigate before serving again"
            ) from None
        return book

    def _load(self, book: LedgerBook) -> None:
        """Fold every entry (checks every hash link), then check the tail's signatures."""
        tail: list[SignedEntry] = []
        head: SignedEntry | None = None
        for item in read_ledger_file(self.path):
            if item.head:
                head = item
                continue
            book.fold(item)
            tail.append(item)
            if len(tail) > TAIL_SIGNATURES:
                del tail[0]
        for entry in tail:
            if not signature_ok(book.public_key, entry.body, entry.signature):
                raise LedgerIntegrityError(
                    f"entry {entry.sequence}: its signature does not verify with the ledger key"
                )
        if head is None:
            if book.sequence:
                raise LedgerIntegrityError(
                    f"the signed head is missing (the ledger has {book.sequence} entries)"
                )
            return
        if not signature_ok(book.public_key, head.body, head.signature):
            raise LedgerIntegrityError("the signed head's signature does not verify")
        recorded = decode_body(head.body)
        if int(recorded["sequence"]) > book.sequence:
            raise LedgerIntegrityError(
                f"entries {book.sequence + 1} to {recorded['sequence']} were deleted from the "
                f"end (the signed head says the ledger ends at entry {recorded['sequence']})"
            )
        if int(recorded["sequence"]) < book.sequence or recorded["hash"] != book.last_hash:
            raise LedgerIntegrityError(
                f"entry {book.sequence} is not the entry the signed head names "
                f"(entry {recorded['sequence']}): entries were appended or replaced"
            )

    # the Accountant interface -----------------------------------------------------------

    @property
    def public_key(self) -> bytes:
        """Raw Ed25519 key that verifies this ledger's entries."""
        return self._book.public_key

    def _catch_up(self) -> None:
        """Fold entries appended by other processes since we last looked (lock held)."""
        rows = self._con.execute(
            "SELECT sequence, body, signature FROM entries WHERE sequence > ? ORDER BY sequence",
            (self._book.sequence,),
        ).fetchall()
        for sequence, body, signature in rows:
            self._book.fold(SignedEntry(int(sequence), bytes(body), bytes(signature)))

    def spent(self, analyst: str | None = None) -> float:
        """rho released in the current period (by one analyst, or in total)."""
        with self._lock:
            self._catch_up()
            return self._book.spent(self._book.now(self.clock()), analyst)

    def status(self, analyst: str | None = None) -> BudgetStatus:
        """The node's budget now; for an analyst, what they can still spend."""
        with self._lock:
            self._catch_up()
            return self._book.status(self._book.now(self.clock()), analyst)

    def check(self, analyst: str, rho: float) -> None:
        """Refuse, before any computation, a query that would break any cap now."""
        with self._lock:
            self._catch_up()
            error = self._book.refusal(analyst, rho, self._book.now(self.clock()))
        if error is not None:
            raise error

    def _write(
        self, build: Callable[[datetime], _Built], keep: Keep | None = None
    ) -> tuple[_Built, datetime]:
        """Build, store and commit one entry (if build makes one), and the release kept with
        it, atomically; fold the entry only once it is durable."""
        if self._read_only:
            raise ConfigError(
                f"ledger {self.path} was opened to be checked only; it records nothing"
            )
        with self._lock, ledger_append_timer():
            con = self._con
            con.execute("BEGIN IMMEDIATE")  # the write lock across processes
            try:
                self._catch_up()
                when = self._book.now(self.clock())
                entry = build(when)
                if entry is not None:
                    head = self._book.head(after=entry)
                    con.execute(
                        "INSERT INTO entries (sequence, body, signature) VALUES (?, ?, ?)",
                        (entry.sequence, entry.body, entry.signature),
                    )
                    con.execute(
                        "INSERT OR REPLACE INTO head (id, sequence, body, signature)"
                        " VALUES (1, ?, ?, ?)",
                        (head.sequence, head.body, head.signature),
                    )
                    if keep is not None:
                        _keep(con, keep, entry.sequence)
                con.execute("COMMIT")  # synchronous=FULL: durable when this returns
            except sqlite3.Error as exc:
                _roll_back(con)
                # A full or failing disk: SQLite's words name the cause and carry no data.
                raise LedgerWriteError(
                    f"this node could not record the entry in its privacy ledger ({exc}), so "
                    "nothing was charged or released; its custodian must fix the ledger's "
                    f"storage ({self.path.parent})"
                ) from None
            except BaseException:
                _roll_back(con)
                raise
            if entry is not None:
                self._book.fold(entry)
            return entry, when

    def _policy_entry(self, override: str | None, when: datetime) -> SignedEntry | None:
        """The policy entry node.toml's budget needs, decided after catching up (lock held):
        another process sharing the file may have recorded the same policy meanwhile."""
        self.policy_change = self._book.plan_policy(self.configured_policy, override)
        if self.policy_change is None:
            return None
        return self._book.policy_entry_for(self.policy_change, when)

    @property
    def policy(self) -> BudgetPolicy:
        """The policy in force: the ledger's latest policy entry's."""
        return self._book.policy

    def lifetime_spent(self, analyst: str | None = None) -> float:
        """rho released since the ledger began, in every period."""
        with self._lock:
            self._catch_up()
            return self._book.lifetime_spent(analyst)

    def charge(self, charge: Charge, keep: Keep | None = None) -> tuple[BudgetStatus, int]:
        """Check every cap and durably record the charge (and the release it keeps), or raise
        and record nothing."""
        entry, when = self._write(lambda when: self._book.charge_entry(charge, when), keep)
        with self._lock:
            return self._book.status(when), entry.sequence

    def stored_release(self, envelope_sha256: bytes) -> Kept | None:
        """The release kept for an unexpired charged envelope (any process's)."""
        with self._lock:
            row = self._con.execute(
                "SELECT sequence, response FROM releases"
                " WHERE envelope_sha256 = ? AND expires_at_ms > ?",
                (envelope_sha256, now_ms()),
            ).fetchone()
        return None if row is None else Kept(sequence=int(row[0]), response=bytes(row[1]))

    def refuse(self, refusal: Refusal) -> None:
        """Record a refusal at zero cost."""
        self._write(lambda when: self._book.refusal_entry(refusal, when))

    def entries(self, from_sequence: int = 1) -> Iterator[SignedEntry]:
        """Every entry from a sequence number on, read lazily from one snapshot."""
        return (e for e in self.stream(from_sequence) if not e.head)

    def stream(self, from_sequence: int = 1) -> Iterator[SignedEntry]:
        """Entries up to the signed head, then the head, from one snapshot (lazily)."""
        return read_ledger_file(self.path, max(1, from_sequence), up_to_head=True)

    def close(self) -> None:
        """Close the write connection (everything committed is already durable)."""
        with self._lock:
            self._con.close()


def _keep(con: sqlite3.Connection, keep: Keep, sequence: int) -> None:
    """Store a release with its charge (inside the charge's transaction); drop expired ones."""
    con.execute("DELETE FROM releases WHERE expires_at_ms <= ?", (now_ms(),))
    con.execute(
        "INSERT OR REPLACE INTO releases (envelope_sha256, sequence, expires_at_ms, response)"
        " VALUES (?, ?, ?, ?)",
        (keep.envelope_sha256, sequence, keep.expires_at_ms, keep.response),
    )


def _roll_back(con: sqlite3.Connection) -> None:
    """Roll back an open transaction; on a failed disk the rollback may fail too."""
    try:
        if con.in_transaction:
            con.execute("ROLLBACK")
    except sqlite3.Error:
        log.warning("could not roll back a failed ledger write (SQLite rolls it back itself)")
