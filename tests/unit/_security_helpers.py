"""Shared by the protocols.security unit tests: a federation PKI and hand-built envelopes.

The PKI, CA and identity tests (test_pki.py) and the envelope tests (test_envelope*.py) sign
and verify with the same identities; each test module makes its own PKI once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from protocols.security.envelope import (
    LEGACY_PAYLOAD_VERSION,
    PAYLOAD_VERSION,
    SIGNATURE_ALGORITHM,
    Audience,
    Operation,
    SignedQuery,
    legacy_signed_payload,
    now_ms,
    signed_payload,
    verify_query,
)
from protocols.security.pki import Identity, Role, create_ca, issue, load_identity
from queries.errors import AuthenticationError, ChcError

QUERY = b'{"rho":0.1,"view":"persons"}'
HUB_1 = Audience(hub="hub-1")
HOUR_MS = 3600 * 1000


@dataclasses.dataclass(frozen=True)
class Pki:
    """A federation CA with one identity per role, and a second, unrelated CA."""

    root: Path
    analyst: Identity
    node: Identity
    hub: Identity
    auditor: Identity
    other_ca_pem: bytes
    other_analyst: Identity


def make_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The identities every security test signs and verifies with (one PKI per module)."""
    root = tmp_path_factory.mktemp("pki")
    create_ca(root)
    ids = {role: load_identity(issue(root, role=role, name=f"{role.value}-1")) for role in Role}
    # Same CA common name on purpose: only the signature may tell the two CAs apart.
    other = tmp_path_factory.mktemp("other-pki")
    other_ca = create_ca(other)
    other_analyst = load_identity(issue(other, role=Role.ANALYST, name="analyst-1"))
    return Pki(
        root=root,
        analyst=ids[Role.ANALYST],
        node=ids[Role.NODE],
        hub=ids[Role.HUB],
        auditor=ids[Role.AUDITOR],
        other_ca_pem=other_ca.read_bytes(),
        other_analyst=other_analyst,
    )


def hand_signed(
    identity: Identity,
    *,
    query: bytes = QUERY,
    analyst: str | None = None,
    nonce: bytes = b"n" * 16,
    issued_at_ms: int | None = None,
    expires_at_ms: int | None = None,
    algorithm: str = SIGNATURE_ALGORITHM,
    operation: Operation = Operation.EXECUTE,
    audience: Audience = HUB_1,
    version: int = PAYLOAD_VERSION,
) -> SignedQuery:
    """An envelope signed with identity's key over exactly these fields, whatever its role.

    version 1 signs the old payload (no operation, no audience), as ledgers still hold.
    """
    issued = now_ms() if issued_at_ms is None else issued_at_ms
    expires = issued + 10 * 60 * 1000 if expires_at_ms is None else expires_at_ms
    name = identity.name if analyst is None else analyst
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    if version == LEGACY_PAYLOAD_VERSION:
        payload = legacy_signed_payload(
            query=query, analyst=name, nonce=nonce, issued_at_ms=issued, expires_at_ms=expires
        )
        operation_signed: Operation | None = None
        audience = Audience()
    else:
        payload = signed_payload(
            query=query,
            analyst=name,
            nonce=nonce,
            issued_at_ms=issued,
            expires_at_ms=expires,
            operation=operation,
            audience=audience,
        )
        operation_signed = operation
    return SignedQuery(
        query=query,
        analyst=name,
        nonce=nonce,
        issued_at_ms=issued,
        expires_at_ms=expires,
        analyst_certificate=identity.cert_pem,
        signature_algorithm=algorithm,
        signature=key.sign(payload, ec.ECDSA(hashes.SHA256())),
        payload_version=version,
        operation=operation_signed,
        audience=audience,
    )


def assert_refused(
    signed: SignedQuery, ca_pem: bytes, match: str | None, at_ms: int | None = None
) -> None:
    """verify_query raises AuthenticationError, which is also a PermissionError."""
    with pytest.raises(AuthenticationError, match=match) as info:
        verify_query(signed, ca_pem, at_ms=at_ms)
    assert isinstance(info.value, PermissionError)
    assert isinstance(info.value, ChcError)
