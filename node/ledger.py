"""The node's privacy ledger: append-only, hash-chained, Ed25519-signed, in SQLite.

Every query a node answers or refuses becomes one entry. An entry's body is canonical JSON
(sorted keys, compact separators, ASCII) holding who asked (the analyst and the signed
envelope itself), what exactly (the canonical query and its SHA-256), what it cost (rho, the
(epsilon, delta) equivalent), the outcome, the caps in force and the spend they were checked
against, and the SHA-256 of the previous entry (body + signature). The node signs each body
with its ledger key. A signed *head* (the last sequence number and its hash) is rewritten in
the same transaction as every append, so deleting entries at the end is detected too.

The caps in force are the ledger's own: a signed *policy* entry (protocols/budget_log.py)
records the whole budget policy whenever the node opens the ledger with a new one.

Charge before release (DESIGN principle 2): `charge()` checks every cap and appends inside one
`BEGIN IMMEDIATE` transaction, under a process lock, and returns only once SQLite has
committed with `synchronous=FULL` (the WAL is fsync'd). Budgets are sums of the entries (in
the current period, and since the ledger began), never a separate counter: `LedgerBook` folds
entries as they are read, and every process catches up on what others appended first.

The entry format is documented in docs/ledger.md; coordinator/audit.py verifies it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from node.accounting import Accountant, Charge, RateLimited, Refusal, SignedEntry
from protocols.budget import BudgetPolicy
from protocols.budget_log import (
    POLICY_RECORD,
    PolicyChange,
    SpendTally,
    budget_refusal,
    budget_status,
    plan_change,
    read_change,
)
from protocols.errors import ChcError, ConfigError, LedgerIntegrityError
from queries import spec
from queries.results import BudgetStatus

FORMAT = 1
ENTRY_RECORD = "chc.ledger.entry"
HEAD_RECORD = "chc.ledger.head"
ZERO_HASH = "0" * 64
RELEASED = "released"
REFUSED = "refused"
# How many of the last entries have their signatures checked when a node opens its ledger (all
# hash links are always checked; `chc audit verify` checks every signature).
TAIL_SIGNATURES = 64
SQLITE_MAGIC = b"SQLite format 3\x00"
# A refusal entry is a bounded digest of the request (docs/ledger.md, "Refusal entries"):
# anyone with a certificate can be refused, so what a refusal costs on disk must not depend
# on what they send. It keeps the SHA-256 and size of the query and of the envelope, the
# first REFUSAL_QUERY_BYTES of the query (a real query is whole) and the first
# REFUSAL_ENVELOPE_BYTES of the envelope; the claimed analyst and the reason are cut too.
REFUSAL_QUERY_BYTES = 2048
REFUSAL_ENVELOPE_BYTES = 256
REFUSAL_REASON_CHARS = 1000
REFUSAL_ANALYST_CHARS = 128
# What SqliteLedger._write builds: an entry, or (for a policy already recorded) nothing.
_Built = TypeVar("_Built", bound=SignedEntry | None)
log = logging.getLogger(__name__)


# ---- the entry format ---------------------------------------------------------------------


def canonical_json(obj: object) -> bytes:
    """The one encoding of ledger bodies: sorted keys, compact, ASCII, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def entry_hash(body: bytes, signature: bytes) -> str:
    """What the next entry's prev_hash must be: SHA-256 of body then signature, in hex."""
    return hashlib.sha256(body + signature).hexdigest()


def format_time(when: datetime) -> str:
    """UTC ISO 8601 with milliseconds, e.g. 2025-06-01T09:30:00.123Z."""
    utc = when.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """Inverse of format_time."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _truncate_ms(when: datetime) -> datetime:
    return when.replace(microsecond=when.microsecond // 1000 * 1000)


def decode_body(body: bytes) -> dict[str, Any]:
    """Parse an entry or head body, refusing anything but a JSON object."""
    parsed = json.loads(body)
    if not isinstance(parsed, dict):
        raise ValueError("the body is not a JSON object")
    return parsed


def query_text(query: bytes) -> str:
    """The canonical query as text (bytes that are not UTF-8 are escaped, never dropped)."""
    return query.decode("utf-8", errors="backslashreplace")


def views_of(query: bytes) -> list[str]:
    """Best effort for refusals, whose query may not even parse: the view it names."""
    if len(query) > spec.MAX_SPEC_BYTES:
        return []  # refused unparsed; not worth parsing here either
    try:
        view = json.loads(query).get("view")
        return [spec.check_identifier(view, "view")]
    except (ValueError, AttributeError, RecursionError):
        return []


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def refusal_fields(refusal: Refusal) -> dict[str, Any]:
    """What a refusal entry records of the request: a digest, never all of it."""
    query, envelope = refusal.query, refusal.envelope
    return {
        "query": query_text(query[:REFUSAL_QUERY_BYTES]),
        "query_sha256": hashlib.sha256(query).hexdigest(),
        "query_size": len(query),
        "query_truncated": len(query) > REFUSAL_QUERY_BYTES,
        "envelope_sha256": hashlib.sha256(envelope).hexdigest(),
        "envelope_size": len(envelope),
        "envelope_prefix": base64.b64encode(envelope[:REFUSAL_ENVELOPE_BYTES]).decode("ascii"),
    }


def rate_limited_fields(limit: RateLimited) -> dict[str, Any]:
    """How a refusal entry records that rate limiting of its peer started."""
    return {
        "peer": _cut(limit.peer, REFUSAL_ANALYST_CHARS),
        "refusals": limit.refusals,
        "window_seconds": float(limit.window_seconds),
        "until": format_time(limit.until),
    }


# ---- keys ---------------------------------------------------------------------------------


def default_key_path(ledger: Path) -> Path:
    """The ledger's signing key beside it: nwc.ledger.sqlite -> nwc.ledger.key."""
    return ledger.with_suffix(".key")


def public_key_path(key_path: Path) -> Path:
    """Where the public half is published beside the key: nwc.ledger.pub."""
    return key_path.with_suffix(".pub")


def public_key_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key (what Describe sends as ledger_public_key)."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _check_private_file(path: Path) -> None:
    if path.is_symlink():
        raise ConfigError(f"ledger key {path} is a symbolic link; refusing to use it")
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise ConfigError(f"ledger key {path} is not a regular file")
    if mode & 0o077:
        raise ConfigError(
            f"ledger key {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run `chmod 600 {path}`"
        )


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The node's Ed25519 ledger key: created (0600, never through a symlink) if missing."""
    if path.is_symlink():
        raise ConfigError(f"ledger key {path} is a symbolic link; refusing to use it")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
    _check_private_file(path)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"ledger key {path} is not an Ed25519 private key")
    pub = public_key_path(path)
    if not pub.exists():
        pub.write_bytes(
            loaded.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return loaded


def load_public_key(path: Path) -> bytes:
    """A raw Ed25519 public key from a PEM public key, a PEM private key, or hex/base64 text."""
    data = path.read_bytes()
    try:
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            if isinstance(private, Ed25519PrivateKey):
                return public_key_bytes(private)
        elif b"PUBLIC KEY" in data:
            public = serialization.load_pem_public_key(data)
            if isinstance(public, Ed25519PublicKey):
                return public.public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                )
        else:
            text = data.decode("ascii").strip()
            raw = bytes.fromhex(text) if len(text) == 64 else base64.b64decode(text)
            if len(raw) == 32:
                return raw
    except ValueError:
        pass
    raise ConfigError(
        f"{path} holds no Ed25519 public key (expected PEM, or 32 bytes as hex or base64)"
    )


def signature_ok(public_key: bytes, body: bytes, signature: bytes) -> bool:
    """Whether signature is the Ed25519 signature of body under the raw public key."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, body)
    except (InvalidSignature, ValueError):
        return False
    return True


# ---- the state machine --------------------------------------------------------------------


class LedgerBook:
    """A ledger's state, independent of storage: the chain's end, the policy, the spend.

    Storage folds every entry in order (`fold`), asks for a decision (`refusal`), and has the
    book build and sign the next entry and head; it folds them only once they are stored.
    The policy in force is the latest policy entry's; before the first one (a new ledger, or
    one written before policy entries existed) it is the configured one, and the storage
    records that as the first policy entry before anything else.
    """

    def __init__(self, *, node: str, policy: BudgetPolicy, key: Ed25519PrivateKey) -> None:
        self.node = node
        self.policy = policy
        self.policy_entry: int | None = None  # the sequence of the policy entry in force
        self._key = key
        self.public_key = public_key_bytes(key)
        self.sequence = 0
        self.last_hash = ZERO_HASH
        self.last_time: datetime | None = None
        self.tally = SpendTally()

    # reading --------------------------------------------------------------------------

    def fold(self, entry: SignedEntry) -> None:
        """Add one stored entry, checking that it extends the chain."""
        where = f"entry {entry.sequence}"
        try:
            body = decode_body(entry.body)
            sequence = int(body["sequence"])
            prev_hash = str(body["prev_hash"])
            when = parse_time(str(body["time"]))
            change: PolicyChange | None = None
            release: tuple[str, float] | None = None
            if body.get("record") == POLICY_RECORD:
                change = read_change(body)
            elif body["outcome"] == RELEASED:
                release = (str(body["analyst"]), float(body["rho"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerIntegrityError(f"{where}: its body is not a ledger entry ({exc})") from None
        if entry.sequence != sequence:
            raise LedgerIntegrityError(
                f"{where}: stored as entry {entry.sequence} but its body says {sequence} "
                "(entries were reordered or renumbered)"
            )
        if sequence != self.sequence + 1:
            raise LedgerIntegrityError(
                f"{where}: follows entry {self.sequence} (entries are missing or repeated)"
            )
        if prev_hash != self.last_hash:
            raise LedgerIntegrityError(
                f"{where}: its prev_hash does not match entry {self.sequence} "
                "(an entry was edited, inserted or deleted)"
            )
        if change is not None:
            self.policy, self.policy_entry = change.policy, sequence
        elif release is not None:
            self.tally.add(when, *release)
        self.sequence = sequence
        self.last_hash = entry_hash(entry.body, entry.signature)
        self.last_time = when

    def now(self, clock_time: datetime) -> datetime:
        """The time for the next entry: the clock, never before the last entry (ms precision)."""
        when = _truncate_ms(clock_time.astimezone(UTC))
        if self.last_time is not None and when < self.last_time:
            return self.last_time
        return when

    def spent(self, when: datetime, analyst: str | None = None) -> float:
        """rho released in the period containing `when` (by one analyst, or in total)."""
        return self.tally.period(self.policy, when).of(analyst)

    def lifetime_spent(self, analyst: str | None = None) -> float:
        """rho released since the ledger began, in every period (by one analyst, or in total)."""
        return self.tally.life.of(analyst)

    def status(self, when: datetime, analyst: str | None = None) -> BudgetStatus:
        """The node's budget; for an analyst, what that analyst can still spend."""
        return budget_status(self.policy, self.tally, when, analyst)

    def refusal(self, analyst: str, rho: float, when: datetime) -> ChcError | None:
        """Why a charge of rho by analyst at `when` must be refused, or None if it fits."""
        return budget_refusal(self.policy, self.tally, analyst, rho, when)

    def plan_policy(self, configured: BudgetPolicy, override: str | None) -> PolicyChange | None:
        """The policy entry configured needs after what was folded (raises if it loosens)."""
        recorded = self.policy if self.policy_entry is not None else None
        return plan_change(
            configured, recorded, self.policy_entry, node=self.node, override=override
        )

    # writing --------------------------------------------------------------------------

    def _sign(self, body: dict[str, Any]) -> tuple[bytes, bytes]:
        raw = canonical_json(body)
        return raw, self._key.sign(raw)

    def _entry(
        self,
        when: datetime,
        *,
        analyst: str,
        query_id: str,
        request: dict[str, Any],
        views: list[str],
        rho: float,
        epsilon: float,
        outcome: str,
        reason: str,
        code: str,
    ) -> SignedEntry:
        p = self.policy
        start, end = p.period_of(when)
        released = rho if outcome == RELEASED else 0.0
        sequence = self.sequence + 1
        period, life = self.tally.period(p, when), self.tally.life
        body: dict[str, Any] = {
            "record": ENTRY_RECORD,
            "format": FORMAT,
            "sequence": sequence,
            "time": format_time(when),
            "node": self.node,
            "analyst": analyst,
            "query_id": query_id,
            **request,
            "views": views,
            "rho": float(rho),
            "epsilon": float(epsilon),
            "delta": float(p.delta),
            "outcome": outcome,
            "reason": reason,
            "code": code,
            "caps": {
                "period": p.period,
                "period_start": start.isoformat() if start else None,
                "period_end": end.isoformat() if end else None,
                "total_rho": float(p.total_rho),
                "max_rho_per_query": float(p.max_rho_per_query),
                "analyst_rho": p.analyst_cap(analyst),
                "lifetime_rho": float(p.lifetime_cap),
                "analyst_lifetime_rho": p.analyst_lifetime_cap(analyst),
                "policy": self.policy_entry,
            },
            "spent": {
                "period_rho": period.total + released,
                "analyst_rho": period.of(analyst) + released,
                "lifetime_rho": life.total + released,
                "analyst_lifetime_rho": life.of(analyst) + released,
            },
            "prev_hash": self.last_hash,
        }
        raw, signature = self._sign(body)
        return SignedEntry(sequence=sequence, body=raw, signature=signature)

    def charge_entry(self, charge: Charge, when: datetime) -> SignedEntry:
        """The signed entry for a release, or raise the reason it must be refused."""
        error = self.refusal(charge.analyst, charge.rho, when)
        if error is not None:
            raise error
        return self._entry(
            when,
            analyst=charge.analyst,
            query_id=charge.query_id,
            request={
                "query": query_text(charge.query),
                "query_sha256": hashlib.sha256(charge.query).hexdigest(),
                "envelope": base64.b64encode(charge.envelope).decode("ascii"),
            },
            views=list(charge.views),
            rho=charge.rho,
            epsilon=charge.epsilon,
            outcome=RELEASED,
            reason="",
            code="",
        )

    def refusal_entry(self, refusal: Refusal, when: datetime) -> SignedEntry:
        """The signed, zero-cost entry for a refusal: a few KB, whatever was sent."""
        request = refusal_fields(refusal)
        if refusal.rate_limited is not None:
            request["rate_limited"] = rate_limited_fields(refusal.rate_limited)
        return self._entry(
            when,
            analyst=_cut(refusal.analyst, REFUSAL_ANALYST_CHARS),
            query_id="",
            request=request,
            views=views_of(refusal.query),
            rho=0.0,
            epsilon=0.0,
            outcome=REFUSED,
            reason=_cut(refusal.reason, REFUSAL_REASON_CHARS),
            code=refusal.code,
        )

    def policy_entry_for(self, change: PolicyChange, when: datetime) -> SignedEntry:
        """The signed policy entry recording a change of budget policy."""
        sequence = self.sequence + 1
        body: dict[str, Any] = {
            **change.fields(),
            "format": FORMAT,
            "sequence": sequence,
            "time": format_time(when),
            "node": self.node,
            "prev_hash": self.last_hash,
        }
        raw, signature = self._sign(body)
        return SignedEntry(sequence=sequence, body=raw, signature=signature)

    def head(self, after: SignedEntry | None = None) -> SignedEntry:
        """The signed head naming the chain's last entry (`after`, or the last one folded)."""
        if after is None:
            sequence, last_hash = self.sequence, self.last_hash
            when = self.last_time
        else:
            sequence, last_hash = after.sequence, entry_hash(after.body, after.signature)
            when = parse_time(str(decode_body(after.body)["time"]))
        body = {
            "record": HEAD_RECORD,
            "format": FORMAT,
            "node": self.node,
            "sequence": sequence,
            "hash": last_hash,
            "time": format_time(when) if when is not None else None,
        }
        raw, signature = self._sign(body)
        return SignedEntry(sequence=sequence, body=raw, signature=signature, head=True)


# ---- SQLite storage -----------------------------------------------------------------------

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries ("
    " sequence INTEGER PRIMARY KEY, body BLOB NOT NULL, signature BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS head ("
    " id INTEGER PRIMARY KEY CHECK (id = 1), sequence INTEGER NOT NULL,"
    " body BLOB NOT NULL, signature BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # Defence in depth against mistakes, not against an attacker (who can drop a trigger):
    # the signatures and the chain are what make tampering evident.
    "CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries"
    " BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries"
    " BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END",
)


def _connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        uri = path.resolve().as_uri() + "?mode=ro"
        con = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        con = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            con.close()
            raise ConfigError(f"cannot put ledger {path} in WAL mode (is it on a network share?)")
    # FULL: every commit fsyncs the WAL, so a charge survives a crash or power loss.
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA busy_timeout=30000")
    return con


def is_sqlite_file(path: Path) -> bool:
    """Whether a file starts with SQLite's magic header."""
    try:
        with path.open("rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def read_meta(path: Path) -> dict[str, str]:
    """The ledger file's meta table (node name, public key, format), read-only."""
    con = _connect(path, read_only=True)
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
    con = _connect(path, read_only=True)
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
        self._con = _connect(path)
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
            for statement in _SCHEMA:
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

    def _write(self, build: Callable[[datetime], _Built]) -> tuple[_Built, datetime]:
        """Build, store and commit one entry (if build makes one) atomically; fold it only
        once it is durable."""
        if self._read_only:
            raise ConfigError(
                f"ledger {self.path} was opened to be checked only; it records nothing"
            )
        with self._lock:
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
                con.execute("COMMIT")  # synchronous=FULL: durable when this returns
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
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

    def charge(self, charge: Charge) -> tuple[BudgetStatus, int]:
        """Check every cap and durably record the charge, or raise and record nothing."""
        entry, when = self._write(lambda when: self._book.charge_entry(charge, when))
        with self._lock:
            return self._book.status(when), entry.sequence

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
