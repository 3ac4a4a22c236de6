"""The outbound link's contract (protocols/v1/link.proto): methods, proofs and statuses.

An outbound-only node dials the hub and serves the hub's calls over one stream
(docs/outbound.md). Both ends share what is here: which Node methods travel over the link,
the signed statements that prove the hub's role to the node and a node's ledger key to an
auditor, the certificate checks behind them, and gRPC statuses as frames.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocols.security.pki import Identity, Role, common_name, role_of
from protocols.v1 import link_pb2
from queries.errors import AuthenticationError

# The Node methods a hub may call over a link, and whether each streams its response.
UNARY_METHODS = frozenset(
    {"Describe", "Explain", "Execute", "FitStep", "SecAggAnnounce", "SecAggShare"}
)
STREAM_METHODS = frozenset({"StreamLedger"})
# Answered by the link itself (node/dial.py), not by the Node service: the node's ledger key,
# signed by the node's certificate key for an auditor's challenge.
LEDGER_KEY = "LedgerKey"
NODE_SERVICE = "/chc.v1.Node/"
# hub.toml's address for a node that dials the hub instead of listening.
DIAL_ADDRESS = "dial"
# In the message of a call to an outbound node that was never sent (no link was open):
# the hub then knows the node was not asked, so charged nothing (coordinator/hub/fanout.py).
NOT_CONNECTED = "is not connected (outbound-only node)"

# How often each end sends a heartbeat, and how long a silent link is trusted: a node that
# is stopped (SIGSTOP, a frozen VM) or cut off without a TCP reset is dropped by the hub
# after this, and its calls fail UNAVAILABLE (reported unreachable), never hang.
HEARTBEAT_S = 1.0
SILENT_AFTER_S = 4.0
# Flow control of a streaming call (HubFrame.credit, 1.3 on): the most messages the hub
# lets a node send ahead of the hub's caller (a ledger entry is about 1-2 KB, so some 100 KB
# per stream), granted again in halves as the caller reads.
STREAM_WINDOW = 64
STREAM_REFILL = STREAM_WINDOW // 2
# Streams a node answers at once over its link, on workers of their own (a stream waiting
# for a slow reader never holds up a query); the hub relays no more than this at a time.
MAX_LINK_STREAMS = 4
# A challenge must be at least this long to be worth signing.
MIN_CHALLENGE_BYTES = 16

_WELCOME_TAG = b"chc-link-welcome-v1\x00"
_LEDGER_KEY_TAG = b"chc-ledger-key-v1\x00"


def _field(value: bytes) -> bytes:
    """A length-prefixed field, so that no two field lists encode alike."""
    return len(value).to_bytes(4, "big") + value


def welcome_payload(hub: str, node: str, challenge: bytes) -> bytes:
    """What the hub signs for one link: its name, the node it verified, the node's challenge.

    The node name is the one the hub read from the node's TLS certificate, so a welcome
    obtained over another node's link does not verify at this node.
    """
    return _WELCOME_TAG + b"".join(_field(v) for v in (hub.encode(), node.encode(), challenge))


def ledger_key_payload(node: str, public_key: bytes, challenge: bytes) -> bytes:
    """What a node signs to vouch for its ledger key, for one auditor's challenge."""
    return _LEDGER_KEY_TAG + b"".join(_field(v) for v in (node.encode(), public_key, challenge))


def sign(identity: Identity, payload: bytes) -> bytes:
    """ECDSA-SHA256 over payload with the identity's certificate key."""
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AuthenticationError(f"the key of {identity.name} is not an ECDSA key")
    return key.sign(payload, ec.ECDSA(hashes.SHA256()))


@dataclass(frozen=True)
class Party:
    """A certificate checked against the federation's CA: its name, role and PEM."""

    name: str
    role: Role
    certificate: x509.Certificate
    pem: bytes


def check_certificate(
    pem: bytes,
    ca_pem: bytes,
    *,
    role: Role,
    what: str,
    name: str | None = None,
    is_revoked: Callable[[x509.Certificate], bool] | None = None,
) -> Party:
    """The party of a certificate issued by the CA, valid now, with this role (and name).

    `what` says whose certificate it is in the error (e.g. "the hub's certificate").
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise AuthenticationError(f"{what} is not a PEM certificate") from None
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise AuthenticationError(f"{what} was not issued by this federation's CA") from None
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise AuthenticationError(f"{what} has expired or is not yet valid")
    if is_revoked is not None and is_revoked(cert):
        raise AuthenticationError(f"{what} has been revoked")
    found, cn = role_of(cert), common_name(cert)
    if found is not role:
        raise AuthenticationError(f"{what} ({cn}) has role {found.value}, not {role.value}")
    if name is not None and cn != name:
        raise AuthenticationError(f"{what} is issued to {cn!r}, not {name!r}")
    return Party(name=cn, role=found, certificate=cert, pem=pem)


def check_signature(party: Party, signature: bytes, payload: bytes, what: str) -> None:
    """Refuse unless party's certificate key signed payload."""
    key = party.certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AuthenticationError(f"{what}: the certificate of {party.name} holds no ECDSA key")
    try:
        key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AuthenticationError(
            f"{what}: the signature of {party.name} does not verify"
        ) from None


def status_frame(
    call_id: int,
    code: grpc.StatusCode,
    details: str,
    trailers: Iterable[tuple[str, str | bytes]] = (),
) -> link_pb2.NodeFrame:
    """The frame that ends a call with a gRPC status."""
    status = link_pb2.CallStatus(code=code.value[0], details=details)
    for key, value in trailers:
        status.trailers[key] = value.decode() if isinstance(value, bytes) else value
    return link_pb2.NodeFrame(call_id=call_id, status=status, end=True)


def status_code(status: link_pb2.CallStatus) -> grpc.StatusCode:
    """The grpc.StatusCode of a CallStatus (UNKNOWN for a number gRPC does not have)."""
    for code in grpc.StatusCode:
        if code.value[0] == status.code:
            return code
    return grpc.StatusCode.UNKNOWN
