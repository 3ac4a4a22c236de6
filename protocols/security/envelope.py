"""Federation PKI, mutual-TLS credentials and analyst-signed query envelopes.

TLS uses ECDSA P-256 certificates because gRPC's TLS stack rejects Ed25519 leaves (DESIGN.md).
A certificate's role (node, hub, analyst, auditor) is its subject's organizational unit, so the
role travels with the identity and every server reads it from the verified peer certificate.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import fcntl
import ipaddress
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from queries.errors import AuthenticationError, ConfigError

SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
# Envelopes may not live longer than this, so that a node's nonce store stays small.
MAX_ENVELOPE_TTL_MS = 24 * 3600 * 1000
# Tolerated clock difference between an analyst's machine and a node.
CLOCK_SKEW_MS = 5 * 60 * 1000


class Role(enum.StrEnum):
    """What a certificate holder may do in the federation."""

    NODE = "node"
    HUB = "hub"
    ANALYST = "analyst"
    AUDITOR = "auditor"


@dataclass(frozen=True)
class Identity:
    """A party's certificate, private key and the federation CA, as PEM bytes."""

    name: str
    role: Role
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    def __repr__(self) -> str:  # never print the private key
        return f"Identity(name={self.name!r}, role={self.role.value!r})"


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (0600), refusing to follow a symlink."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise ConfigError(f"{path} is a symbolic link; refusing to write a private key there")
    # O_NOFOLLOW closes the gap between the check above and the open.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(pki_dir: Path, *, common_name: str = "chc federation CA", days: int = 3650) -> Path:
    """Create a federation CA (ECDSA P-256) in pki_dir; refuse to overwrite an existing one."""
    cert_path, key_path = pki_dir / CA_FILE, pki_dir / CA_KEY_FILE
    if cert_path.exists() or key_path.exists():
        raise ConfigError(f"a CA already exists in {pki_dir}; use another folder or remove it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pki_dir.mkdir(parents=True, exist_ok=True)
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _check_name(name: str) -> None:
    if (
        not name
        or len(name) > 64
        or not all((c.isascii() and c.isalnum()) or c in "-_." for c in name)
    ):
        raise ConfigError(
            f"identity name {name!r} is not allowed: use 1-64 letters, digits, '-', '_' or '.'"
        )
    if name.startswith("."):
        raise ConfigError(f"identity name {name!r} may not start with '.'")


def issue(
    pki_dir: Path,
    *,
    role: Role,
    name: str,
    out_dir: Path | None = None,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
    days: int = 365,
    organisation: str | None = None,
) -> Path:
    """Issue an ECDSA P-256 certificate for name with role; returns its identity folder.

    The folder holds cert.pem, key.pem (0600) and a copy of the CA certificate, which is all a
    party needs. Servers get the name and hosts as subject alternative names.
    """
    _check_name(name)
    ca_key_pem = (pki_dir / CA_KEY_FILE).read_bytes()
    ca_pem = (pki_dir / CA_FILE).read_bytes()
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{pki_dir / CA_KEY_FILE} is not an ECDSA key")
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [
        x509.NameAttribute(NameOID.COMMON_NAME, name),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
    ]
    if organisation:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    subject = x509.Name(attributes)
    sans: list[x509.GeneralName] = [x509.DNSName(name)]
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder = out_dir if out_dir is not None else pki_dir / role.value / name
    folder.mkdir(parents=True, exist_ok=True)
    _write_private(folder / KEY_FILE, _key_pem(key))
    (folder / CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / CA_FILE).write_bytes(ca_pem)
    _record_issued(pki_dir, name=name, role=role, cert=cert, folder=folder)
    return folder


ISSUED_FILE = "issued.json"


def _record_issued(
    pki_dir: Path, *, name: str, role: Role, cert: x509.Certificate, folder: Path
) -> None:
    """Keep an index of issued certificates so that `chc pki revoke NAME` finds them."""
    index_path = pki_dir / ISSUED_FILE
    # An exclusive lock so that two concurrent `chc pki issue` runs cannot lose an entry.
    with (pki_dir / ".issued.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        index = json.loads(index_path.read_text()) if index_path.exists() else []
        _append_issued(index, name=name, role=role, cert=cert, folder=folder)
        tmp = index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(index_path)


def _append_issued(
    index: list[dict[str, str]], *, name: str, role: Role, cert: x509.Certificate, folder: Path
) -> None:
    index.append(
        {
            "name": name,
            "role": role.value,
            "serial": format(cert.serial_number, "x"),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "folder": str(folder),
        }
    )


def organisation_of(cert: x509.Certificate) -> str:
    """The certificate's organisation (empty if none), used by node access policies."""
    names = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(names[0].value) if names else ""


def role_of(cert: x509.Certificate) -> Role:
    """The role carried in a certificate's organizational unit."""
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    values = {str(u.value) for u in units}
    for role in Role:
        if role.value in values:
            return role
    raise AuthenticationError(
        "the certificate carries no chc role; ask the federation to reissue it"
    )


def common_name(cert: x509.Certificate) -> str:
    """The certificate's common name, the party's identity in the federation."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise AuthenticationError("the certificate has no common name")
    return str(names[0].value)


def load_identity(folder: Path) -> Identity:
    """Load an identity folder written by issue(), with a clear error if anything is missing."""
    paths = {f: folder / f for f in (CERT_FILE, KEY_FILE, CA_FILE)}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ConfigError(
            f"identity folder {folder} is incomplete (missing {', '.join(missing)}); "
            "create it with `chc pki issue`"
        )
    cert_pem = paths[CERT_FILE].read_bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    return Identity(
        name=common_name(cert),
        role=role_of(cert),
        cert_pem=cert_pem,
        key_pem=paths[KEY_FILE].read_bytes(),
        ca_pem=paths[CA_FILE].read_bytes(),
    )


# Raise gRPC's 4 MB default deliberately: releases are small, but a grouped table with many
# public keys or a catalog can grow; 64 MB is a ceiling, not an expectation.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """Server-side mutual TLS: clients must present a certificate from the federation CA."""
    return grpc.ssl_server_credentials(
        [(identity.key_pem, identity.cert_pem)],
        root_certificates=identity.ca_pem,
        require_client_auth=True,
    )


def secure_channel(address: str, identity: Identity, *, server_name: str) -> grpc.Channel:
    """A mutual-TLS channel that accepts only a server whose certificate names server_name."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )
    options = (*GRPC_OPTIONS, ("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, creds, options=options)


@dataclass(frozen=True)
class Peer:
    """The authenticated party at the other end of a mutual-TLS connection."""

    name: str
    role: Role


def peer_of(
    context: grpc.ServicerContext,
    *,
    is_revoked: Callable[[x509.Certificate], bool] | None = None,
) -> Peer:
    """Read the caller's identity and role from its verified TLS certificate.

    gRPC has already checked the chain to the CA; revocation is checked here because gRPC's
    Python API does not take a CRL.
    """
    # gRPC returns a list of values per key (grpc-stubs types it as bytes).
    raw: object = context.auth_context().get("x509_pem_cert")
    pem = raw[0] if isinstance(raw, list | tuple) and raw else raw
    if not isinstance(pem, bytes):
        raise AuthenticationError("no client certificate; connect with mutual TLS")
    cert = x509.load_pem_x509_certificate(pem)
    if is_revoked is not None and is_revoked(cert):
        raise AuthenticationError(
            f"the certificate of {common_name(cert)} has been revoked; ask for a new one"
        )
    return Peer(name=common_name(cert), role=role_of(cert))


# ---- analyst-signed envelopes -------------------------------------------------------------


class Operation(enum.StrEnum):
    """The one thing an analyst signs an envelope for."""

    EXECUTE = "execute"  # run the query and release it, charging the budget
    EXPLAIN = "explain"  # plan and price it, spending nothing
    BUDGET = "budget"  # the probe `chc budget` explains to read the analyst's budget


class Call(enum.StrEnum):
    """The calls that take a signed envelope, at a node and at the hub alike."""

    EXECUTE = "Execute"  # Node.Execute, Hub.Submit
    EXPLAIN = "Explain"  # Node.Explain, Hub.Explain


# Execute runs and charges, so only an envelope signed to execute opens it: an envelope
# signed to explain or to probe the budget is never run, even by whoever relays it. Explain
# spends nothing and shows the plan, the price and the analyst's budget, all of which the
# execute envelope shows anyway when it runs, so Explain also takes execute envelopes (a
# client may price the very envelope it is about to run).
ACCEPTED_OPERATIONS: dict[Call, frozenset[Operation]] = {
    Call.EXECUTE: frozenset({Operation.EXECUTE}),
    Call.EXPLAIN: frozenset({Operation.EXPLAIN, Operation.BUDGET, Operation.EXECUTE}),
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
    return int(_now().timestamp() * 1000)


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
        _check_name(name)
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
