"""What a query entry of a ledger records, checked against the analyst's signed envelope.

`chc audit verify` (coordinator/audit/verification.py) checks the chain, the sequence, the
node's signatures and the head, and hands every query entry's content here: its query and
hashes against the envelope it released under (or, for a refusal, the bounded digest of the
request), its outcome and cost, whether the envelope was replayed or charged outside its
validity, the analyst's signature against the federation CA and what the envelope allowed,
and for a masked share of a secure aggregate what its `secure_aggregation` record claims,
against the envelope's pooled_only query, its audience and the charge. Budget fields go on to
coordinator/audit/budget.py. It is separate because it is about what was released and to
whom, not about whether the ledger is intact.
"""

from __future__ import annotations

import base64
import hashlib
import math
from datetime import datetime
from typing import Any

from google.protobuf.message import DecodeError

from coordinator.audit.budget import BudgetChecks, Flag, close, number
from coordinator.audit.secure_checks import secure_aggregation_problems
from protocols import serde
from protocols.budget.rules import cap_exceeded
from protocols.ledger.entry import (
    REFUSED,
    RELEASED,
    FitStepRecord,
    format_time,
    parse_time,
    query_text,
    read_fit,
    read_secure_aggregation,
)
from protocols.security.envelope import (
    CLOCK_SKEW_MS,
    LEDGER_PAYLOAD_VERSIONS,
    LEGACY_PAYLOAD_VERSION,
    Operation,
    SignedQuery,
    verify_query,
)
from protocols.v1 import node_pb2
from queries import mlp, spec_io
from queries.errors import AuthenticationError, QueryError
from queries.mechanisms import rho_to_epsilon
from queries.model import Family
from queries.model_io import model_from_json
from queries.numbers import show, show_apart
from queries.results import SecureAggregation

# A release is charged after the query ran, so its time may follow the envelope's expiry by
# as long as a query may take; anything later means the node charged an expired envelope.
EXPIRY_GRACE_MS = 10 * 60 * 1000
# Said once per ledger that holds releases signed before envelopes named what they were for.
_LEGACY_NOTE = "some releases carry version-1 envelopes"
# Secure-aggregation shares noted one by one in the verification's notes; the rest are counted.
_SHARES_NOTED = 20


def _count(value: object) -> int | None:
    """A count (a whole number, at least 0), or None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _sha256(value: object) -> bool:
    """Whether value is a SHA-256 in lower-case hex."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= set("0123456789abcdef")


def _pooled_only(envelope: node_pb2.QueryEnvelope) -> bool:
    """Whether the envelope holds a query that asks for a secure aggregate only."""
    try:
        return spec_io.from_json(envelope.query).pooled_only
    except (QueryError, ValueError):
        return False  # a model, or a query flagged elsewhere


class QueryChecks:
    """Checks each query entry's content as it comes, and tallies releases and refusals."""

    def __init__(
        self, flag: Flag, budget: BudgetChecks, notes: list[str], ca_pem: bytes | None
    ) -> None:
        self.flag = flag
        self.budget = budget
        self.notes = notes  # the verification's notes, appended to in entry order
        self.ca = ca_pem
        self.released = 0
        self.refused = 0
        self.rho_released = 0.0
        # A query's nonce, or (nonce, step) for a fit's step: the entry that released it.
        self.nonces: dict[bytes | tuple[bytes, int], int] = {}
        # Per fit envelope (nonce): the rho its steps were charged, and the model's rho.
        self.fits: dict[bytes, list[float]] = {}
        self.design_refused: dict[bytes, int] = {}  # fit nonce: its refused design check
        self.rate_limits = 0  # refusal entries that started rate limiting a peer
        self.secure_shares = 0  # releases that are masked shares of a secure aggregate
        self._more_shares: int | None = None  # the note counting shares not noted one by one

    def _envelope(self, label: int, body: dict[str, Any]) -> node_pb2.QueryEnvelope | None:
        raw = body.get("envelope")
        try:
            data = base64.b64decode(str(raw), validate=True)
            envelope = node_pb2.QueryEnvelope.FromString(data)
        except (ValueError, DecodeError):
            self.flag(label, "its envelope is not a base64 serialised QueryEnvelope")
            return None
        return envelope if data else None

    def entry(self, label: int, body: dict[str, Any], when: datetime) -> None:
        """One query entry (a release or a refusal) whose time has been read."""
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
            self.released += 1
            self.rho_released += rho
            self._release(label, body, envelope, when, rho, epsilon, delta, per_query)
            self.budget.spend(label, analyst, when, rho, key, caps, spent)
        elif outcome == REFUSED:
            self.refused += 1
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
            self.notes.append(
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
                label,
                f"epsilon {show(epsilon)} is not the equivalent of rho {show(rho)} "
                f"at {show(delta)}",
            )
        if per_query is None:
            self.flag(label, f"rho {show(rho)} has no per-query cap in force")
        elif cap_exceeded(rho, per_query):
            asked, cap = show_apart(rho, per_query)
            self.flag(label, f"rho {asked} is above the per-query cap {cap} in force")
        if envelope is None:
            self.flag(label, "a release without the analyst's signed envelope")
            return
        if envelope.analyst != body.get("analyst"):
            self.flag(
                label,
                f"is charged to {body.get('analyst')!r} but the envelope was signed by "
                f"{envelope.analyst!r}",
            )
        try:
            fit = read_fit(body)
        except ValueError as exc:
            self.flag(label, str(exc))
            return
        key: bytes | tuple[bytes, int] = envelope.nonce
        if fit is not None:
            key = (envelope.nonce, fit.step)
            self._fit(label, fit, envelope, rho)
        # A malformed share is flagged and the release still checked (replay, window,
        # signature): the envelope's nonce is the key either way.
        try:
            secure = read_secure_aggregation(body)
        except ValueError as exc:
            self.flag(label, str(exc))
        else:
            if secure is not None:
                self._secure_aggregation(label, body, secure, envelope, rho)
            elif fit is None and _pooled_only(envelope):
                # Nodes refuse to Execute these: only a masked share may leave for them.
                self.flag(
                    label,
                    "released the node's own figures for a pooled_only query (the analyst "
                    "asked for a secure aggregate only)",
                )
        earlier = self.nonces.get(key)
        if earlier is not None:
            what = "the envelope" if fit is None else f"step {fit.step} of the fit"
            self.flag(label, f"replays {what} already released as entry {earlier}")
        self.nonces[key] = label
        when_ms = int(when.timestamp() * 1000)
        if when_ms < envelope.issued_at_ms - CLOCK_SKEW_MS:
            self.flag(label, "was charged before the analyst signed the query")
        if when_ms > envelope.expires_at_ms + EXPIRY_GRACE_MS:
            self.flag(label, "was charged long after the analyst's envelope expired")
        if self.ca is not None:
            signed = serde.signed_query_from_proto(envelope)
            self._analyst_signature(label, body, signed, self.ca, fit is not None)

    def _secure_aggregation(
        self,
        label: int,
        body: dict[str, Any],
        record: SecureAggregation,
        envelope: node_pb2.QueryEnvelope,
        rho: float,
    ) -> None:
        """A masked share of a secure aggregate: its record checked and noted in one line."""
        node = body.get("node")
        for problem in secure_aggregation_problems(
            record, envelope, node if isinstance(node, str) else None, rho
        ):
            self.flag(label, problem)
        self.secure_shares += 1
        if self.secure_shares <= _SHARES_NOTED:
            self.notes.append(
                f"entry {label}: a secure-aggregation share (k = {record.nodes}, t = "
                f"{record.threshold}): rho {show(rho)} charged, {show(record.rho_threshold)} "
                f"if only {record.threshold} nodes are honest, {show(record.rho_all_honest)} "
                f"if all {record.nodes} are"
            )
            return
        more = (
            f"and {self.secure_shares - _SHARES_NOTED} more secure-aggregation shares (the "
            f"last: entry {label})"
        )
        if self._more_shares is None:
            self._more_shares = len(self.notes)
            self.notes.append(more)
        else:
            self.notes[self._more_shares] = more

    def _fit(
        self, label: int, fit: FitStepRecord, envelope: node_pb2.QueryEnvelope, rho: float
    ) -> None:
        """One step of a model fit: within the model's steps, its coefficients, its total."""
        try:
            model = model_from_json(envelope.query)
        except QueryError as exc:
            self.flag(label, f"records a fit step, but its envelope holds no model spec: {exc}")
            return
        if fit.steps != model.steps or not 0 <= fit.step < model.steps:
            self.flag(
                label,
                f"records step {fit.step} of {fit.steps}, but the model has steps 0 to "
                f"{model.steps - 1}",
            )
        newton = fit.step > 0 and model.family is not Family.GAUSSIAN
        per_step = mlp.count(len(fit.columns), model.hidden) if model.hidden else len(fit.columns)
        wanted = per_step if newton else 0
        if fit.step == model.evaluation_step:
            wanted += 2  # and the score histograms' range (queries/model_checks.py)
        if len(fit.coefficients) != wanted or not all(map(math.isfinite, fit.coefficients)):
            self.flag(
                label,
                f"records {len(fit.coefficients)} coefficient(s) for step {fit.step}; it must "
                f"record the {wanted} finite coefficient(s) the hub sent",
            )
        if fit.step == 0 and fit.refused:
            self.design_refused[envelope.nonce] = label
        elif fit.step > 0 and envelope.nonce in self.design_refused:
            self.flag(
                label,
                f"releases step {fit.step} of a fit the node refused at its design check "
                f"(entry {self.design_refused[envelope.nonce]})",
            )
        spent = self.fits.setdefault(envelope.nonce, [])
        spent.append(rho)
        if cap_exceeded(sum(spent), model.rho):
            self.flag(
                label,
                f"the fit's steps so far total rho {sum(spent):.6g}, above the model's rho "
                f"{model.rho:.6g} that the analyst signed",
            )

    def _analyst_signature(
        self, label: int, body: dict[str, Any], signed: SignedQuery, ca: bytes, fit: bool = False
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
            if not any(n.startswith(_LEGACY_NOTE) for n in self.notes):
                self.notes.append(
                    f"{_LEGACY_NOTE} (the first: entry {label}): their signatures verify, but "
                    "version 1 did not say which operation or which hub and nodes they were for"
                )
            return
        # A query is released under an execute envelope, a fit's step under a fit one.
        wanted = Operation.FIT if fit else Operation.EXECUTE
        if signed.operation is not wanted:
            what = signed.operation.value if signed.operation else "no operation"
            self.flag(
                label,
                f"was released under an envelope the analyst signed for {what}, not to "
                + ("fit a model" if fit else "execute"),
            )
        node = body.get("node")
        if signed.audience.nodes and node not in signed.audience.nodes:
            self.flag(
                label,
                f"was released by node {node!r}, which the analyst's envelope does not address "
                f"(it names {', '.join(signed.audience.canonical_nodes())})",
            )
