"""Analyst-signed query envelopes: what an analyst signs, signing, and verifying it.

An envelope binds a query to the analyst who signed it, the one operation it authorises and
the audience (hub, nodes) that may present it, in a versioned payload. Verification checks the
analyst's certificate against the federation CA (`pki`) and the signature; what the envelope
authorises is checked per call. It is kept apart from mutual TLS (`tls`) because it proves
the analyst's intent end to end, whoever relays it.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocols.security.pki import (
    Identity,
    Role,
    check_name,
    common_name,
    organisation_of,
    role_of,
)
from queries.errors import AuthenticationError, ConfigError

SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"
# Envelopes may not live longer than this, so that a node's nonce store stays small.
MAX_ENVELOPE_TTL_MS = 24 * 3600 * 1000
# Tolerated clock difference between an analyst's machine and a node.
CLOCK_SKEW_MS = 5 * 60 * 1000


class Operation(enum.StrEnum):
    """The one thing an analyst signs an envelope for."""

    EXECUTE = "execute"  # run the query and release it, charging the budget
    EXPLAIN = "explain"  # plan and price it, spending nothing
    BUDGET = "budget"  # the probe `chc budget` explains to read the analyst's budget
    FIT = "fit"  # fit a model (queries/model.py): its charged steps, and its explain


class Call(enum.StrEnum):
    """The calls that take a signed envelope, at a node and at the hub alike."""

    EXECUTE = "Execute"  # Node.Execute, Hub.Submit
    EXPLAIN = "Explain"  # Node.Explain, Hub.Explain
    FIT = "Fit"  # Node.FitStep, Hub.Fit


# Execute runs and charges, so only an envelope signed to execute opens it: an envelope
# signed to explain or to probe the budget is never run, even by whoever relays it. Explain
# spends nothing and shows the plan, the price and the analyst's budget, all of which the
# execute envelope shows anyway when it runs, so Explain also takes execute envelopes (a
# client may price the very envelope it is about to run).
ACCEPTED_OPERATIONS: dict[Call, frozenset[Operation]] = {
    Call.EXECUTE: frozenset({Operation.EXECUTE}),
    Call.EXPLAIN: frozenset(
        {Operation.EXPLAIN, Operation.BUDGET, Operation.EXECUTE, Operation.FIT}
    ),
    # A fit's steps are charged, so only an envelope signed to fit opens them; and a fit
    # envelope opens no Execute (its query bytes are a model, not a query).
    Call.FIT: frozenset({Operation.FIT}),
}


@dataclass(frozen=True)
class Audience:
    """Who may present an envelope: one hub, by its certificate name, and optionally nodes.

    An empty hub means no hub may relay it (the analyst calls nodes directly); no nodes means
    every node may accept it.
    """

    hub: str = ""
    nodes: tuple[str, ...] = ()

    def canonical_nodes(self) -> list[str]:
        """The nodes as a set, in one order, as they are signed."""
        return sorted(set(self.nodes))


# Version 1 signed the query, analyst, nonce and validity window only, so one signature
# authorised every call to every node through any hub. Version 2 adds the operation and the
# audience. The version travels in the envelope and is bound by the payload's domain tag, so
# a signature of one version never verifies as the other.
LEGACY_PAYLOAD_VERSION = 1
PAYLOAD_VERSION = 2
# Nodes and the hub accept the current version only; auditors also verify version 1, which
# ledgers written before version 2 hold.
CURRENT_PAYLOAD_VERSIONS = frozenset({PAYLOAD_VERSION})
LEDGER_PAYLOAD_VERSIONS = frozenset({LEGACY_PAYLOAD_VERSION, PAYLOAD_VERSION})
_PAYLOAD_TAGS = {
    LEGACY_PAYLOAD_VERSION: b"chc.v1.QueryEnvelope\n",
    PAYLOAD_VERSION: b"chc.v1.QueryEnvelope.payload-v2\n",
}


@dataclass(frozen=True)
class SignedQuery:
    """A query with the analyst's signature over it, what it is for and who may present it."""

    query: bytes
    analyst: str
    nonce: bytes
    issued_at_ms: int
    expires_at_ms: int
    analyst_certificate: bytes
    signature_algorithm: str
    signature: bytes
    payload_version: int = PAYLOAD_VERSION
    operation: Operation | None = None  # None: not said (version 1) or not understood
    audience: Audience = Audience()


def _canonical(tag: bytes, body: dict[str, object]) -> bytes:
    return tag + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def signed_payload(
    *,
    query: bytes,
    analyst: str,
    nonce: bytes,
    issued_at_ms: int,
    expires_at_ms: int,
    operation: Operation,
    audience: Audience,
) -> bytes:
    """The exact bytes an analyst signs: a versioned domain tag, canonical JSON of every field."""
    body: dict[str, object] = {
        "analyst": analyst,
        "audience": {"hub": audience.hub, "nodes": audience.canonical_nodes()},
        "expires_at_ms": expires_at_ms,
        "issued_at_ms": issued_at_ms,
        "nonce": base64.b64encode(nonce).decode(),
        "operation": operation.value,
        "query": base64.b64encode(query).decode(),
    }
    return _canonical(_PAYLOAD_TAGS[PAYLOAD_VERSION], body)


def legacy_signed_payload(
    *, query: bytes, analyst: str, nonce: bytes, issued_at_ms: int, expires_at_ms: int
) -> bytes:
    """The bytes a version-1 envelope signed (no operation, no audience); old ledgers only."""
    body: dict[str, object] = {
        "analyst": analyst,
        "expires_at_ms": expires_at_ms,
        "issued_at_ms": issued_at_ms,
        "nonce": base64.b64encode(nonce).decode(),
        "query": base64.b64encode(query).decode(),
    }
    return _canonical(_PAYLOAD_TAGS[LEGACY_PAYLOAD_VERSION], body)


def payload_of(signed: SignedQuery) -> bytes:
    """The bytes an envelope's signature must cover, by its payload version."""
    if signed.payload_version == LEGACY_PAYLOAD_VERSION:
        return legacy_signed_payload(
            query=signed.query,
            analyst=signed.analyst,
            nonce=signed.nonce,
            issued_at_ms=signed.issued_at_ms,
            expires_at_ms=signed.expires_at_ms,
        )
    if signed.payload_version != PAYLOAD_VERSION:
        raise AuthenticationError(_version_problem(signed.payload_version))
    if signed.operation is None:
        raise AuthenticationError(
            "the envelope does not say which operation it authorises "
            f"({', '.join(o.value for o in Operation)}); sign the query again"
        )
    return signed_payload(
        query=signed.query,
        analyst=signed.analyst,
        nonce=signed.nonce,
        issued_at_ms=signed.issued_at_ms,
        expires_at_ms=signed.expires_at_ms,
        operation=signed.operation,
        audience=signed.audience,
    )


def check_payload_version(
    signed: SignedQuery, versions: frozenset[int] = CURRENT_PAYLOAD_VERSIONS
) -> None:
    """Refuse an envelope signed in a payload version not in versions, saying what to do."""
    if signed.payload_version not in versions:
        raise AuthenticationError(_version_problem(signed.payload_version))


def _version_problem(version: int) -> str:
    if version == LEGACY_PAYLOAD_VERSION:
        return (
            "the envelope is signed in the version-1 format, which does not say which "
            "operation it authorises or who may relay it, so it is no longer accepted; "
            "upgrade chc and sign the query again"
        )
    return (
        f"the envelope's signature payload version {version} is not one this party "
        f"verifies (version {PAYLOAD_VERSION}); sign the query again with this chc version"
    )


def now_ms() -> int:
    """Milliseconds since the Unix epoch, UTC."""
    return int(dt.datetime.now(dt.UTC).timestamp() * 1000)


def sign_query(
    identity: Identity,
    query: bytes,
    *,
    operation: Operation = Operation.EXECUTE,
    audience: Audience = Audience(),
    ttl_ms: int = 10 * 60 * 1000,
) -> SignedQuery:
    """Sign canonical query bytes as the analyst, for one operation and audience, for ttl_ms.

    The default audience names no hub: only the analyst can then present the envelope, to
    nodes directly. To go through a hub, name it (its certificate name).
    """
    if identity.role is not Role.ANALYST:
        raise AuthenticationError(
            f"{identity.name} has role {identity.role.value}; only analysts sign queries"
        )
    if not 0 < ttl_ms <= MAX_ENVELOPE_TTL_MS:
        raise ConfigError(f"ttl_ms must be between 1 and {MAX_ENVELOPE_TTL_MS}")
    # Names as certificates carry them, so that a typo fails here rather than at every node.
    for name in ([audience.hub] if audience.hub else []) + list(audience.nodes):
        check_name(name)
    audience = Audience(hub=audience.hub, nodes=tuple(audience.canonical_nodes()))
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the analyst key is not an ECDSA key")
    nonce = secrets.token_bytes(16)
    issued = now_ms()
    payload = signed_payload(
        query=query,
        analyst=identity.name,
        nonce=nonce,
        issued_at_ms=issued,
        expires_at_ms=issued + ttl_ms,
        operation=operation,
        audience=audience,
    )
    return SignedQuery(
        query=query,
        analyst=identity.name,
        nonce=nonce,
        issued_at_ms=issued,
        expires_at_ms=issued + ttl_ms,
        analyst_certificate=identity.cert_pem,
        signature_algorithm=SIGNATURE_ALGORITHM,
        signature=key.sign(payload, ec.ECDSA(hashes.SHA256())),
        payload_version=PAYLOAD_VERSION,
        operation=operation,
        audience=audience,
    )


_WHAT = {
    Operation.EXECUTE: "to execute the query",
    Operation.EXPLAIN: "to explain the query (`chc query --explain`)",
    Operation.BUDGET: "as a budget probe (`chc budget`)",
    Operation.FIT: "to fit a model (`chc learn glm`)",
}


def check_operation(signed: SignedQuery, call: Call) -> None:
    """Refuse an envelope whose signed operation does not authorise this call."""
    accepted = ACCEPTED_OPERATIONS[call]
    if signed.operation in accepted:
        return
    what = "for no operation" if signed.operation is None else _WHAT[signed.operation]
    if call is Call.EXECUTE:
        raise AuthenticationError(
            f"the analyst signed this envelope {what}, not to execute it, so it cannot be run "
            "or charged (nothing was); to run the query, sign it for execute"
        )
    raise AuthenticationError(
        f"the analyst signed this envelope {what}, which {call.value} does not accept "
        f"(it takes {', '.join(sorted(o.value for o in accepted))}); sign the query again"
    )


def check_audience(signed: SignedQuery, *, node: str, hub: str | None) -> None:
    """Refuse an envelope presented at a node, or through a hub, that its audience does not name.

    hub is the relaying hub's certificate name, or None when the analyst calls the node.
    """
    audience = signed.audience
    if hub is not None and audience.hub != hub:
        if not audience.hub:
            raise AuthenticationError(
                f"the analyst signed this envelope for calling nodes directly, so no hub may "
                f"relay it (hub {hub!r} did); sign it for the hub that relays it"
            )
        raise AuthenticationError(
            f"this envelope is addressed to hub {audience.hub!r}, not to hub {hub!r} that "
            "relayed it; the analyst must sign it for the hub that relays it"
        )
    if audience.nodes and node not in audience.nodes:
        raise AuthenticationError(
            f"this envelope is addressed to node(s) {', '.join(audience.canonical_nodes())}, "
            f"not to {node!r}; sign it for this node (or for every node) to query it here"
        )


@dataclass(frozen=True)
class VerifiedAnalyst:
    """Who signed a query, as proven by a certificate from the federation CA."""

    name: str
    organisation: str
    serial: int


def verify_query(
    signed: SignedQuery,
    ca_pem: bytes,
    *,
    at_ms: int | None = None,
    versions: frozenset[int] = CURRENT_PAYLOAD_VERSIONS,
) -> str:
    """Verify an envelope's chain, role, validity window and signature; the analyst's name."""
    return verify_analyst(signed, ca_pem, at_ms=at_ms, versions=versions).name


def verify_analyst(
    signed: SignedQuery,
    ca_pem: bytes,
    *,
    at_ms: int | None = None,
    is_revoked: Callable[[x509.Certificate], bool] | None = None,
    versions: frozenset[int] = CURRENT_PAYLOAD_VERSIONS,
) -> VerifiedAnalyst:
    """Verify an envelope's certificate chain, revocation, role, validity window and signature.

    Only payload versions in versions verify. Nonce freshness, the operation and the
    audience are the caller's job (they depend on the call and on who presents it).
    """
    check_payload_version(signed, versions)
    now = now_ms() if at_ms is None else at_ms
    try:
        cert = x509.load_pem_x509_certificate(signed.analyst_certificate)
    except ValueError as exc:
        raise AuthenticationError("the envelope's analyst certificate is not valid PEM") from exc
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AuthenticationError(
            "the analyst certificate was not issued by this federation's CA"
        ) from exc
    now_dt = dt.datetime.fromtimestamp(now / 1000, dt.UTC)
    if not cert.not_valid_before_utc <= now_dt <= cert.not_valid_after_utc:
        raise AuthenticationError("the analyst certificate has expired or is not yet valid")
    if is_revoked is not None and is_revoked(cert):
        raise AuthenticationError(
            "the analyst certificate has been revoked; ask the federation for a new one"
        )
    if role_of(cert) is not Role.ANALYST:
        raise AuthenticationError("queries must be signed with an analyst certificate")
    if common_name(cert) != signed.analyst:
        raise AuthenticationError("the envelope's analyst does not match its certificate")
    if signed.signature_algorithm != SIGNATURE_ALGORITHM:
        raise AuthenticationError(
            f"unsupported signature algorithm {signed.signature_algorithm!r}; "
            f"use {SIGNATURE_ALGORITHM}"
        )
    if signed.expires_at_ms - signed.issued_at_ms > MAX_ENVELOPE_TTL_MS:
        raise AuthenticationError("the envelope's validity window is longer than 24 hours")
    if signed.issued_at_ms > now + CLOCK_SKEW_MS:
        raise AuthenticationError("the envelope was issued in the future; check the clock")
    if signed.expires_at_ms <= now:
        raise AuthenticationError("the envelope has expired; sign the query again")
    if len(signed.nonce) < 16:
        raise AuthenticationError("the envelope's nonce is shorter than 16 bytes")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise AuthenticationError("the analyst certificate does not hold an ECDSA key")
    payload = payload_of(signed)
    try:
        public_key.verify(signed.signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise AuthenticationError("the query's signature does not match its contents") from exc
    return VerifiedAnalyst(
        name=signed.analyst, organisation=organisation_of(cert), serial=cert.serial_number
    )
