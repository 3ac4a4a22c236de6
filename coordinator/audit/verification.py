"""Auditing privacy ledgers: read them, verify them entry by entry, export them, report spend.

A ledger can be read from a node's SQLite file, from an export (JSON Lines or Parquet), or
from each node directly over mutual TLS with an auditor certificate. The hub only tells an
auditor where the nodes are: it never relays ledgers, so it cannot trim what an auditor sees.

`verify` checks everything the entry format (node/ledger.py, docs/ledger.md) promises: the
hash chain, every signature against the node's public key, the sequence (gaps, repeats,
reordering), the signed head (deletions at the end), every released query's envelope against
the federation CA, and that recorded totals never exceeded the caps in force. It names the
entry of every anomaly and keeps going, so one report shows everything that is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf.message import DecodeError

from coordinator.audit.budget import BudgetChecks, PolicyNote, close, number
from protocols import serde
from protocols.budget.rules import POLICY_RECORD, cap_exceeded
from protocols.ledger.entry import (
    ENTRY_RECORD,
    FORMAT,
    HEAD_RECORD,
    REFUSED,
    RELEASED,
    ZERO_HASH,
    SignedEntry,
    canonical_json,
    decode_body,
    default_key_path,
    entry_hash,
    format_time,
    load_public_key,
    parse_time,
    public_key_path,
    query_text,
    signature_ok,
)
from protocols.ledger.file import is_sqlite_file, read_ledger_file, read_meta
from protocols.security import (
    CLOCK_SKEW_MS,
    LEDGER_PAYLOAD_VERSIONS,
    LEGACY_PAYLOAD_VERSION,
    Identity,
    Operation,
    SignedQuery,
    secure_channel,
    verify_query,
)
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.errors import AuthenticationError, ChcError
from queries.mechanisms import rho_to_epsilon

# A release is charged after the query ran, so its time may follow the envelope's expiry by
# as long as a query may take; anything later means the node charged an expired envelope.
EXPIRY_GRACE_MS = 10 * 60 * 1000
EXPORT_MAGIC = "chc_ledger"
PARQUET_MAGIC = b"PAR1"
# Said once per ledger that holds releases signed before envelopes named what they were for.
_LEGACY_NOTE = "some releases carry version-1 envelopes"


class AuditError(RuntimeError, ChcError):
    """A ledger could not be read (the node, file or export is unavailable or malformed)."""


def _count(value: object) -> int | None:
    """A count (a whole number, at least 0), or None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _sha256(value: object) -> bool:
    """Whether value is a SHA-256 in lower-case hex."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= set("0123456789abcdef")


# ---- sources ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerSource:
    """One node's ledger as an auditor reads it: entries in stored order, then the head."""

    label: str  # a path, or node@address
    node: str  # "" when the source does not say
    public_key: bytes | None
    key_origin: str  # where the public key came from, for the report
    read: Callable[[], Iterator[SignedEntry]]


def _sqlite_source(path: Path, public_key: bytes | None, key_origin: str) -> LedgerSource:
    meta = read_meta(path)
    if public_key is None:
        key_file = default_key_path(path)
        for candidate in (public_key_path(key_file), key_file):
            if candidate.is_file():
                public_key, key_origin = load_public_key(candidate), str(candidate)
                break
    if public_key is None and "public_key" in meta:
        public_key = bytes.fromhex(meta["public_key"])
        key_origin = "the ledger's own meta table (proves self-consistency only; give --public-key)"
    return LedgerSource(
        label=str(path),
        node=meta.get("node", ""),
        public_key=public_key,
        key_origin=key_origin,
        read=lambda: read_ledger_file(path),
    )


def _entry_from_json(obj: dict[str, Any], *, head: bool = False) -> SignedEntry:
    if "body_b64" in obj:
        body = base64.b64decode(obj["body_b64"])
    else:
        body = str(obj["body"]).encode("utf-8")
    return SignedEntry(
        sequence=int(obj["sequence"]),
        body=body,
        signature=base64.b64decode(obj["signature"]),
        head=head,
    )


def _jsonl_header(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        header = json.loads(first)[EXPORT_MAGIC]
    except (ValueError, KeyError, TypeError):
        raise AuditError(
            f"{path} is neither a ledger (SQLite), a Parquet export nor a JSON Lines export "
            "written by `chc audit export`"
        ) from None
    if not isinstance(header, dict):
        raise AuditError(f"{path}: malformed export header")
    return header


def _read_jsonl(path: Path) -> Iterator[SignedEntry]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if number == 1 or not line.strip():
                continue
            try:
                obj = json.loads(line)
                if "head" in obj:
                    yield _entry_from_json(obj["head"], head=True)
                else:
                    yield _entry_from_json(obj)
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditError(
                    f"{path}, line {number}: not a ledger export line ({exc})"
                ) from None


def _parquet_header(path: Path) -> dict[str, Any]:
    meta = pq.read_metadata(path).metadata or {}
    raw = meta.get(EXPORT_MAGIC.encode())
    if raw is None:
        raise AuditError(f"{path} is a Parquet file but not a chc ledger export")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise AuditError(f"{path}: malformed export metadata")
    return header


def _read_parquet(path: Path) -> Iterator[SignedEntry]:
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(columns=["sequence", "body", "signature"]):
        for row in batch.to_pylist():
            yield SignedEntry(
                sequence=int(row["sequence"]),
                body=bytes(row["body"]),
                signature=bytes(row["signature"]),
            )
    head = _parquet_header(path).get("head")
    if isinstance(head, dict):
        yield _entry_from_json(head, head=True)


def open_file(path: Path, *, public_key: bytes | None = None) -> LedgerSource:
    """A ledger file (SQLite) or an export (JSON Lines or Parquet), recognised by content.

    The key that checks signatures is, in order: the one given; for a ledger file, the
    `.pub` (or `.key`) file beside it; for an export, the key recorded when it was made.
    """
    if not path.is_file():
        raise AuditError(f"{path} does not exist or is not a file")
    origin = "given" if public_key is not None else ""
    if is_sqlite_file(path):
        return _sqlite_source(path, public_key, origin)
    with path.open("rb") as f:
        magic = f.read(4)
    if magic == PARQUET_MAGIC:
        header, reader = _parquet_header(path), _read_parquet
    else:
        header, reader = _jsonl_header(path), _read_jsonl
    if public_key is None and header.get("public_key"):
        public_key = bytes.fromhex(str(header["public_key"]))
        origin = f"the export header ({header.get('key_origin', 'unknown origin')})"
    return LedgerSource(
        label=str(path),
        node=str(header.get("node", "")),
        public_key=public_key,
        key_origin=origin,
        read=lambda: reader(path),
    )


def _rpc_error(exc: grpc.RpcError, what: str) -> AuditError:
    call = exc if isinstance(exc, grpc.Call) else None
    code = call.code() if call is not None else grpc.StatusCode.UNKNOWN
    details = (call.details() if call is not None else None) or code.name
    return AuditError(f"{what}: {code.name}: {details}")


def open_remote(
    node: str, address: str, identity: Identity, *, timeout_s: float = 600.0
) -> LedgerSource:
    """A node's ledger read from the node itself over mutual TLS (auditor certificate).

    The node's TLS certificate must carry `node` as its name, so another party cannot answer
    for it; its ledger key comes from its own Describe over the same authenticated channel.
    """
    channel = secure_channel(address, identity, server_name=node)
    stub = node_pb2_grpc.NodeStub(channel)
    try:
        described = stub.Describe(node_pb2.DescribeRequest(), timeout=30.0)
    except grpc.RpcError as exc:
        channel.close()
        raise _rpc_error(exc, f"cannot describe node {node} at {address}") from None
    public_key = bytes(described.ledger_public_key) or None

    def read() -> Iterator[SignedEntry]:
        try:
            for e in stub.StreamLedger(node_pb2.LedgerRequest(from_sequence=1), timeout=timeout_s):
                yield SignedEntry(e.sequence, bytes(e.body), bytes(e.signature), head=e.head)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, f"cannot read the ledger of node {node} at {address}") from None

    return LedgerSource(
        label=f"{node}@{address}",
        node=described.node or node,
        public_key=public_key,
        key_origin=f"node {node}'s Describe over mutual TLS",
        read=read,
    )


def node_addresses(hub: str, identity: Identity, *, timeout_s: float = 30.0) -> dict[str, str]:
    """Every node's address as the hub knows it (the auditor then connects to each)."""
    from coordinator.analyst.client import (
        Federation,  # the analysts' client, also fine for auditors
    )

    with Federation(hub, identity) as fed:
        return fed.addresses(timeout_s=timeout_s)


# ---- verification -------------------------------------------------------------------------


@dataclass(frozen=True)
class Anomaly:
    """One thing wrong with a ledger, at an entry (its sequence number) or the whole."""

    entry: int | None
    problem: str

    def __str__(self) -> str:
        return f"entry {self.entry}: {self.problem}" if self.entry is not None else self.problem


@dataclass
class Verification:
    """What verifying one ledger found."""

    source: str
    node: str
    key_origin: str
    entries: int = 0
    released: int = 0
    refused: int = 0
    rho_released: float = 0.0
    anomalies: list[Anomaly] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Every policy entry: the caps from then on, and any loosening with its override reason.
    policies: list[PolicyNote] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No anomaly at all."""
        return not self.anomalies

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        out = asdict(self)
        out["ok"] = self.ok
        out["anomalies"] = [{"entry": a.entry, "problem": a.problem} for a in self.anomalies]
        return out


class _Verifier:
    """Checks entries one at a time (a ledger is never held in memory), then the head."""

    def __init__(
        self, result: Verification, public_key: bytes | None, ca_pem: bytes | None
    ) -> None:
        self.r = result
        self.key = public_key
        self.ca = ca_pem
        self.expected = 1
        self.prev_hash = ZERO_HASH
        self.last_label: int | None = None
        self.last_time: datetime | None = None
        self.bad_signatures: list[int] = []
        self.budget = BudgetChecks(self.flag)
        self.nonces: dict[bytes, int] = {}
        self.rate_limits = 0  # refusal entries that started rate limiting a peer

    def flag(self, entry: int | None, problem: str) -> None:
        self.r.anomalies.append(Anomaly(entry, problem))

    def entry(self, item: SignedEntry) -> None:
        self.r.entries += 1
        stored = item.sequence
        this_hash = entry_hash(item.body, item.signature)
        try:
            body = decode_body(item.body)
        except ValueError as exc:
            self.flag(stored, f"its body is not a JSON object ({exc})")
            self._advance(stored, stored, this_hash)
            return
        seq = body.get("sequence")
        label = seq if isinstance(seq, int) and not isinstance(seq, bool) else stored
        if self.key is not None and not signature_ok(self.key, item.body, item.signature):
            self.bad_signatures.append(label)
        if canonical_json(body) != item.body:
            self.flag(label, "its body is not in canonical form (it was re-encoded or edited)")
        record = body.get("record")
        if record not in (ENTRY_RECORD, POLICY_RECORD) or body.get("format") != FORMAT:
            self.flag(label, f"is not a format-{FORMAT} ledger entry")
        if label != stored:
            self.flag(
                stored,
                f"is stored as entry {stored} but its signed body says it is entry {label} "
                "(entries were reordered or renumbered)",
            )
        elif label > self.expected:
            missing = (
                f"entry {self.expected} is"
                if label == self.expected + 1
                else f"entries {self.expected} to {label - 1} are"
            )
            self.flag(label, f"{missing} missing before it (deleted)")
        elif label < self.expected:
            self.flag(label, f"comes after entry {self.last_label}: out of order or repeated")
        if body.get("prev_hash") != self.prev_hash:
            if self.last_label is None:
                self.flag(
                    label,
                    "its prev_hash is not the first entry's zero hash: the ledger does not "
                    "start here (entries were deleted from the start)",
                )
            else:
                self.flag(
                    label,
                    f"its prev_hash does not match the entry before it (entry "
                    f"{self.last_label}): an entry was edited, inserted, deleted or moved",
                )
        node = body.get("node")
        if self.r.node and node != self.r.node:
            self.flag(label, f"belongs to node {node!r}, not {self.r.node!r}")
        elif not self.r.node and isinstance(node, str):
            self.r.node = node
        try:
            when = parse_time(str(body.get("time")))
        except ValueError:
            self.flag(label, f"its time {body.get('time')!r} is not UTC ISO 8601 with ms")
            when = None
        if when is not None and self.last_time is not None and when < self.last_time:
            self.flag(label, f"its time is earlier than entry {self.last_label}'s")
        if when is not None and record == POLICY_RECORD:
            self.budget.policy_entry_body(label, body)
            self.last_time = when
        elif when is not None:
            self._content(label, body, when)
            self.last_time = when
        self._advance(label, label, this_hash)

    def _advance(self, label: int, seq: int, this_hash: str) -> None:
        self.expected = max(self.expected, seq + 1)
        self.prev_hash = this_hash
        self.last_label = label

    def _envelope(self, label: int, body: dict[str, Any]) -> node_pb2.QueryEnvelope | None:
        raw = body.get("envelope")
        try:
            data = base64.b64decode(str(raw), validate=True)
            envelope = node_pb2.QueryEnvelope.FromString(data)
        except (ValueError, DecodeError):
            self.flag(label, "its envelope is not a base64 serialised QueryEnvelope")
            return None
        return envelope if data else None

    def _content(self, label: int, body: dict[str, Any], when: datetime) -> None:
        query = body.get("query")
        envelope: node_pb2.QueryEnvelope | None = None
        if body.get("outcome") == REFUSED and "envelope" not in body:
            # Refusals are recorded as a bounded digest of the request (docs/ledger.md);
            # older refusal entries keep the whole envelope and are checked below.
            self._refusal_digest(label, body, when)
        else:
            envelope = self._envelope(label, body)
            raw_query = envelope.query if envelope is not None else str(query).encode("utf-8")
            if body.get("query_sha256") != hashlib.sha256(raw_query).hexdigest():
                self.flag(label, "its query_sha256 is not the SHA-256 of the query it records")
            if envelope is not None and query_text(envelope.query) != query:
                self.flag(label, "its query is not the query in the analyst's envelope")
        outcome = body.get("outcome")
        rho, epsilon, delta = (number(body.get(k)) for k in ("rho", "epsilon", "delta"))
        caps = body.get("caps")
        spent = body.get("spent")
        if rho is None or epsilon is None or delta is None:
            self.flag(label, "rho, epsilon and delta must be numbers")
            return
        if not isinstance(caps, dict) or not isinstance(spent, dict):
            self.flag(label, "it records no caps or spend")
            return
        analyst = str(body.get("analyst"))
        key, per_query = self.budget.caps(label, analyst, caps, delta, when)
        if outcome == RELEASED:
            self.r.released += 1
            self.r.rho_released += rho
            self._release(label, body, envelope, when, rho, epsilon, delta, per_query)
            self.budget.spend(label, analyst, when, rho, key, caps, spent)
        elif outcome == REFUSED:
            self.r.refused += 1
            if rho != 0 or epsilon != 0:
                self.flag(label, f"a refusal must cost nothing but records rho {rho:g}")
            if not body.get("reason"):
                self.flag(label, "a refusal without a reason")
            self.budget.spend(label, analyst, when, 0.0, key, caps, spent)
        else:
            self.flag(label, f"unknown outcome {outcome!r}")

    def _refusal_digest(self, label: int, body: dict[str, Any], when: datetime) -> None:
        """A refusal's digest of its request: well formed, and its hashes match what it keeps."""
        query, cut, prefix = (
            body.get("query"),
            body.get("query_truncated"),
            body.get("envelope_prefix"),
        )
        size, envelope_size = _count(body.get("query_size")), _count(body.get("envelope_size"))
        if (
            not isinstance(query, str)
            or not isinstance(cut, bool)
            or not isinstance(prefix, str)
            or size is None
            or envelope_size is None
            or not _sha256(body.get("query_sha256"))
            or not _sha256(body.get("envelope_sha256"))
        ):
            self.flag(
                label,
                "a refusal without its request: neither an envelope nor a well-formed digest "
                "(query, query_size, query_truncated, query_sha256, envelope_size, "
                "envelope_sha256, envelope_prefix)",
            )
            return
        # A query kept whole and valid UTF-8 encodes back to exactly its size: check its hash.
        whole = query.encode("utf-8", errors="surrogatepass")
        if (
            not cut
            and len(whole) == size
            and hashlib.sha256(whole).hexdigest() != body.get("query_sha256")
        ):
            self.flag(label, "its query_sha256 is not the SHA-256 of the query it records")
        try:
            head = base64.b64decode(prefix, validate=True)
        except ValueError:
            self.flag(label, "its envelope_prefix is not base64")
            return
        if len(head) > envelope_size:
            self.flag(label, "its envelope_prefix is longer than its envelope_size")
        elif len(head) == envelope_size and hashlib.sha256(head).hexdigest() != body.get(
            "envelope_sha256"
        ):
            self.flag(label, "its envelope_sha256 is not the SHA-256 of the envelope it records")
        if "rate_limited" in body:
            self._rate_limited(label, body["rate_limited"], when)

    def _rate_limited(self, label: int, limited: object, when: datetime) -> None:
        """The one entry that says refusals from a peer stopped being recorded for a while."""
        fields = limited if isinstance(limited, dict) else {}
        peer, refusals = fields.get("peer"), _count(fields.get("refusals"))
        window = number(fields.get("window_seconds"))
        try:
            until: datetime | None = parse_time(str(fields.get("until")))
        except ValueError:
            until = None
        if (
            not isinstance(peer, str)
            or refusals is None
            or window is None
            or not window > 0
            or until is None
            or until < when
        ):
            self.flag(label, f"its rate_limited record is malformed: {limited!r:.200}")
            return
        self.rate_limits += 1
        if self.rate_limits <= 20:  # a note per episode, within reason
            self.r.notes.append(
                f"entry {label}: refusals from {peer} were rate-limited after {refusals} in "
                f"{window:g} s; until {format_time(until)} further refusals from it were "
                "answered but not recorded"
            )

    def _release(
        self,
        label: int,
        body: dict[str, Any],
        envelope: node_pb2.QueryEnvelope | None,
        when: datetime,
        rho: float,
        epsilon: float,
        delta: float,
        per_query: float | None,
    ) -> None:
        if not (math.isfinite(rho) and rho > 0):
            self.flag(label, f"a release must cost a positive rho, records {rho!r}")
            return
        if 0 < delta < 1 and not close(epsilon, rho_to_epsilon(rho, delta)):
            self.flag(
                label, f"epsilon {epsilon:g} is not the equivalent of rho {rho:g} at {delta:g}"
            )
        if per_query is None or cap_exceeded(rho, per_query):
            self.flag(label, f"rho {rho:g} is above the per-query cap {per_query} in force")
        if envelope is None:
            self.flag(label, "a release without the analyst's signed envelope")
            return
        if envelope.analyst != body.get("analyst"):
            self.flag(
                label,
                f"is charged to {body.get('analyst')!r} but the envelope was signed by "
                f"{envelope.analyst!r}",
            )
        earlier = self.nonces.get(envelope.nonce)
        if earlier is not None:
            self.flag(label, f"replays the envelope already released as entry {earlier}")
        self.nonces[envelope.nonce] = label
        when_ms = int(when.timestamp() * 1000)
        if when_ms < envelope.issued_at_ms - CLOCK_SKEW_MS:
            self.flag(label, "was charged before the analyst signed the query")
        if when_ms > envelope.expires_at_ms + EXPIRY_GRACE_MS:
            self.flag(label, "was charged long after the analyst's envelope expired")
        if self.ca is not None:
            signed = serde.signed_query_from_proto(envelope)
            self._analyst_signature(label, body, signed, self.ca)

    def _analyst_signature(
        self, label: int, body: dict[str, Any], signed: SignedQuery, ca: bytes
    ) -> None:
        """The envelope's signature, in the payload version it was signed in, and what it allows."""
        try:
            # Ledgers keep every envelope as it was released, in the payload version of its
            # day, so old entries are verified as what they are: version 1 or 2.
            verify_query(signed, ca, at_ms=signed.issued_at_ms, versions=LEDGER_PAYLOAD_VERSIONS)
        except (AuthenticationError, ValueError) as exc:
            self.flag(
                label,
                f"the analyst's signature in its envelope does not verify against the "
                f"federation CA: {exc}",
            )
            return
        if signed.payload_version == LEGACY_PAYLOAD_VERSION:
            if not any(n.startswith(_LEGACY_NOTE) for n in self.r.notes):
                self.r.notes.append(
                    f"{_LEGACY_NOTE} (the first: entry {label}): their signatures verify, but "
                    "version 1 did not say which operation or which hub and nodes they were for"
                )
            return
        if signed.operation is not Operation.EXECUTE:
            what = signed.operation.value if signed.operation else "no operation"
            self.flag(
                label,
                f"was released under an envelope the analyst signed for {what}, not to execute",
            )
        node = body.get("node")
        if signed.audience.nodes and node not in signed.audience.nodes:
            self.flag(
                label,
                f"was released by node {node!r}, which the analyst's envelope does not address "
                f"(it names {', '.join(signed.audience.canonical_nodes())})",
            )

    def head(self, item: SignedEntry | None) -> None:
        last = self.expected - 1
        if item is None:
            if self.r.entries:
                self.flag(
                    None,
                    "there is no signed head, so entries deleted from the end could not be "
                    "detected",
                )
            return
        if self.key is not None and not signature_ok(self.key, item.body, item.signature):
            self.flag(None, "the signed head's signature does not verify with the node's key")
        try:
            head = decode_body(item.body)
            sequence = int(head["sequence"])
        except (ValueError, KeyError, TypeError):
            self.flag(None, "the signed head is not a ledger head")
            return
        if head.get("record") != HEAD_RECORD:
            self.flag(None, "the signed head is not a ledger head")
        if self.r.node and head.get("node") != self.r.node:
            self.flag(None, f"the signed head belongs to node {head.get('node')!r}")
        if sequence > last:
            missing = (
                f"entry {sequence} is"
                if sequence == last + 1
                else f"entries {last + 1} to {sequence} are"
            )
            self.flag(
                last + 1,
                f"{missing} missing at the end: the node's signed head says the ledger ends at "
                f"entry {sequence}",
            )
        elif sequence < last:
            self.flag(
                sequence + 1,
                f"entries {sequence + 1} to {last} are not covered by the node's signed head, "
                f"which ends at entry {sequence} (appended without the node's key?)",
            )
        elif head.get("hash") != self.prev_hash:
            self.flag(
                last,
                "is not the entry the node's signed head names (the hashes differ): the last "
                "entry was replaced",
            )

    def finish(self) -> None:
        bad = self.bad_signatures
        if bad and len(bad) == self.r.entries and len(bad) > 1:
            self.flag(
                bad[0],
                f"its signature does not verify with the node's public key, and neither does "
                f"any other of the {len(bad)} entries: wrong key ({self.r.key_origin})",
            )
        else:
            for label in bad:
                self.flag(
                    label,
                    "its signature does not verify with the node's public key (the entry was "
                    "edited, or signed by another key)",
                )
        self.r.anomalies.sort(key=lambda a: (a.entry is None, a.entry or 0))


def verify(source: LedgerSource, *, ca_pem: bytes | None = None) -> Verification:
    """Check one ledger completely; every anomaly is reported with its entry."""
    result = Verification(source=source.label, node=source.node, key_origin=source.key_origin)
    verifier = _Verifier(result, source.public_key, ca_pem)
    if source.public_key is None:
        result.anomalies.append(
            Anomaly(None, "no public key to check signatures with; give --public-key")
        )
    if ca_pem is None:
        result.notes.append("analyst signatures not checked: give --ca or --identity")
    head: SignedEntry | None = None
    for item in source.read():
        if item.head:
            head = item
        elif head is not None:
            verifier.flag(item.sequence, "comes after the signed head")
        else:
            verifier.entry(item)
    verifier.head(head)
    verifier.finish()
    result.policies = verifier.budget.notes
    return result


def compare_with_earlier(current: LedgerSource, earlier: LedgerSource) -> list[Anomaly]:
    """Whether a ledger still holds, unchanged, every entry an earlier copy of it held.

    The chain alone cannot stop whoever holds the node's key from rewriting history and
    re-signing it; an auditor who kept an earlier export can (the ledger is append-only).
    """
    kept = {e.sequence: entry_hash(e.body, e.signature) for e in earlier.read() if not e.head}
    found: list[Anomaly] = []
    for e in current.read():
        if e.head or e.sequence not in kept:
            continue
        if entry_hash(e.body, e.signature) != kept.pop(e.sequence):
            found.append(
                Anomaly(e.sequence, f"differs from the earlier copy {earlier.label}: rewritten")
            )
    for sequence in sorted(kept):
        found.append(
            Anomaly(sequence, f"was in the earlier copy {earlier.label} but is gone: deleted")
        )
    return found


# ---- export -------------------------------------------------------------------------------


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
