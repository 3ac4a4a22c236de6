"""Per-query X25519 keys and the signed announcements that bind them to a node and a query.

In round 1 of secure aggregation each node makes a fresh X25519 key pair for the query and
announces its public key, signed with its long-term ECDSA identity key (certified by the
federation CA, role node) over its name and the query's digest (SHA-256 of the signed
envelope's bytes). Every node verifies every other node's announcement itself, so a hub that
relays them cannot substitute a key of its own: it would have to forge a node's signature,
and an announcement made for one query does not verify for another.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from protocols.security.pki import Identity, Role, common_name, role_of
from queries.errors import AuthenticationError, ConfigError

SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"
DIGEST_BYTES = 32
PUBLIC_KEY_BYTES = 32
# The domain tag keeps an announcement's signature from verifying as any other signed bytes.
_PAYLOAD_TAG = b"chc.v1.SecaggAnnouncement\n"


def query_digest(envelope_bytes: bytes) -> bytes:
    """The query's digest every announcement and mask is bound to: SHA-256 of the envelope."""
    return hashlib.sha256(envelope_bytes).digest()


def new_round_key() -> x25519.X25519PrivateKey:
    """A fresh X25519 key for one query; never reuse it for another (or a second mask)."""
    return x25519.X25519PrivateKey.generate()


def public_bytes(key: x25519.X25519PublicKey) -> bytes:
    """The 32 raw bytes of an X25519 public key, as announced."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Announcement:
    """A node's round key for one query, signed by the node's identity (round 1)."""

    name: str
    public_key: bytes  # X25519, 32 raw bytes
    query_digest: bytes  # SHA-256 of the query envelope
    certificate: bytes  # the node's PEM certificate
    signature: bytes  # DER ECDSA over signed_payload(...)
    signature_algorithm: str = SIGNATURE_ALGORITHM


@dataclass(frozen=True)
class VerifiedAnnouncement:
    """An announcement verify_announcement accepted: whose key it is, for which query."""

    name: str
    public_key: x25519.X25519PublicKey
    query_digest: bytes

    @property
    def public_key_bytes(self) -> bytes:
        """The key's 32 raw bytes."""
        return public_bytes(self.public_key)


def signed_payload(*, name: str, public_key: bytes, query_digest: bytes) -> bytes:
    """The exact bytes a node signs: a domain tag and canonical JSON of every field."""
    body = {
        "name": name,
        "public_key": base64.b64encode(public_key).decode(),
        "query_digest": query_digest.hex(),
    }
    return _PAYLOAD_TAG + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def announce(identity: Identity, round_key: x25519.X25519PrivateKey, digest: bytes) -> Announcement:
    """Sign this node's round public key for the query with the given digest."""
    if identity.role is not Role.NODE:
        raise AuthenticationError(
            f"{identity.name} has role {identity.role.value}; only nodes announce "
            "secure-aggregation keys"
        )
    if len(digest) != DIGEST_BYTES:
        raise ConfigError(f"the query digest must be {DIGEST_BYTES} bytes, got {len(digest)}")
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("the node's identity key is not an ECDSA key")
    public = public_bytes(round_key.public_key())
    payload = signed_payload(name=identity.name, public_key=public, query_digest=digest)
    return Announcement(
        name=identity.name,
        public_key=public,
        query_digest=digest,
        certificate=identity.cert_pem,
        signature=key.sign(payload, ec.ECDSA(hashes.SHA256())),
    )


def verify_announcement(
    ann: Announcement,
    ca_pem: bytes,
    expected_digest: bytes,
    *,
    expected_name: str | None = None,
    at: dt.datetime | None = None,
    is_revoked: Callable[[x509.Certificate], bool] | None = None,
) -> VerifiedAnnouncement:
    """Check an announcement's chain to the CA, role node, name, digest and signature.

    expected_name, when given, is the node the relaying hub says it came from. Anything else
    is refused with an AuthenticationError naming what failed.
    """
    who = repr(ann.name)
    if ann.signature_algorithm != SIGNATURE_ALGORITHM:
        raise AuthenticationError(
            f"announcement from {who}: unsupported signature algorithm "
            f"{ann.signature_algorithm!r}; use {SIGNATURE_ALGORITHM}"
        )
    try:
        cert = x509.load_pem_x509_certificate(ann.certificate)
    except ValueError as exc:
        raise AuthenticationError(
            f"announcement from {who}: its certificate is not valid PEM"
        ) from exc
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AuthenticationError(
            f"announcement from {who}: its certificate was not issued by this federation's CA"
        ) from exc
    now = at if at is not None else dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AuthenticationError(
            f"announcement from {who}: its certificate has expired or is not yet valid"
        )
    if is_revoked is not None and is_revoked(cert):
        raise AuthenticationError(f"announcement from {who}: its certificate has been revoked")
    role = role_of(cert)
    if role is not Role.NODE:
        raise AuthenticationError(
            f"announcement from {who}: its certificate has role {role.value}, not node; only "
            "nodes take part in secure aggregation"
        )
    if common_name(cert) != ann.name:
        raise AuthenticationError(
            f"announcement from {who}: its name does not match its certificate "
            f"({common_name(cert)!r})"
        )
    if expected_name is not None and ann.name != expected_name:
        raise AuthenticationError(
            f"announcement from {who} was relayed as node {expected_name!r}'s"
        )
    if not hmac.compare_digest(ann.query_digest, expected_digest):
        raise AuthenticationError(
            f"announcement from {who} is for another query (its digest does not match this "
            "query's envelope)"
        )
    if len(ann.public_key) != PUBLIC_KEY_BYTES:
        raise AuthenticationError(
            f"announcement from {who}: its X25519 key is {len(ann.public_key)} bytes, "
            f"not {PUBLIC_KEY_BYTES}"
        )
    signer = cert.public_key()
    if not isinstance(signer, ec.EllipticCurvePublicKey):
        raise AuthenticationError(f"announcement from {who}: its certificate holds no ECDSA key")
    payload = signed_payload(
        name=ann.name, public_key=ann.public_key, query_digest=ann.query_digest
    )
    try:
        signer.verify(ann.signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise AuthenticationError(
            f"announcement from {who}: the signature does not match its key, name and digest"
        ) from exc
    return VerifiedAnnouncement(
        name=ann.name,
        public_key=x25519.X25519PublicKey.from_public_bytes(ann.public_key),
        query_digest=ann.query_digest,
    )
