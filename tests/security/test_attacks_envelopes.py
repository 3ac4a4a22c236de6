"""Attacks on signed envelopes in flight: expiry, replay, tampering and forgery.

Each attack asserts the refusal (status code and a message that says what to fix) and that
no node's budget moved. Threat model: docs/threat-model.md.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.local.federation import AUDITOR_NAME, HUB_NAME, LocalFederation
from protocols import serde
from protocols.security.envelope import (
    PAYLOAD_VERSION,
    SIGNATURE_ALGORITHM,
    Audience,
    Operation,
    now_ms,
    signed_payload,
)
from protocols.security.pki import Role
from protocols.v1 import node_pb2
from queries.spec import Query, canonical_bytes
from tests.security._attack_helpers import (
    NODE,
    QUERY,
    _analyst,
    _execute,
    _identity,
    _node_stub,
    _signed,
    _spent,
)

pytestmark = pytest.mark.integration


def _refusal_logged(fed: LocalFederation, code: str) -> bool:
    """True if the node's ledger holds a zero-cost refusal with this status code."""
    stub = _node_stub(fed, _identity(fed, Role.AUDITOR, AUDITOR_NAME))
    for entry in stub.StreamLedger(node_pb2.LedgerRequest(from_sequence=1), timeout=10):
        body = json.loads(entry.body)
        if body.get("outcome") == "refused" and body.get("code") == code:
            assert body.get("rho", 0) == 0
            return True
    return False


@pytest.mark.usefixtures("unchanged_budget")
def test_expired_envelope(fed: LocalFederation) -> None:
    signed = _signed(fed, ttl_ms=1)
    time.sleep(0.05)
    err = _execute(_node_stub(fed, _analyst(fed)), serde.signed_query_to_proto(signed))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (err.details() or "")
    assert _refusal_logged(fed, "UNAUTHENTICATED")


def test_replayed_envelope_reads_the_kept_release(fed: LocalFederation) -> None:
    """A replay (or a retry after a lost reply) gets the same release again, charged once."""
    stub = _node_stub(fed, _analyst(fed))
    envelope = serde.signed_query_to_proto(_signed(fed))
    first = stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    before = _spent(fed)
    again = stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    assert again.resent
    assert not first.resent
    # The same noisy values and receipt: never a fresh draw, which would average the noise.
    assert (again.table, again.query_id, again.ledger_sequence) == (
        first.table,
        first.query_id,
        first.ledger_sequence,
    )
    assert again.rho_charged == first.rho_charged  # what it cost, once
    assert _spent(fed) == before


def _same_nonce(fed: LocalFederation, envelope: node_pb2.QueryEnvelope) -> node_pb2.QueryEnvelope:
    """A genuine analyst signature over another query that reuses an envelope's nonce."""
    analyst = _analyst(fed)
    key = serialization.load_pem_private_key(analyst.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    other = node_pb2.QueryEnvelope()
    other.CopyFrom(envelope)
    other.query = canonical_bytes(Query(view="persons", rho=0.05, group_by=("age_band",)))
    payload = signed_payload(
        query=other.query,
        analyst=other.analyst,
        nonce=other.nonce,
        issued_at_ms=other.issued_at_ms,
        expires_at_ms=other.expires_at_ms,
        operation=Operation.EXECUTE,
        audience=Audience(),
    )
    other.signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    return other


def test_another_envelope_reusing_a_nonce_is_refused(fed: LocalFederation) -> None:
    """Only the very envelope that was answered is answered again; a nonce is used once."""
    stub = _node_stub(fed, _analyst(fed))
    envelope = serde.signed_query_to_proto(_signed(fed))
    stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    before = _spent(fed)
    err = _execute(stub, _same_nonce(fed, envelope))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (err.details() or "")
    assert _spent(fed) == before


@pytest.mark.usefixtures("unchanged_budget")
def test_tampered_query_under_a_valid_signature(fed: LocalFederation) -> None:
    envelope = serde.signed_query_to_proto(_signed(fed))
    bigger = Query(view="persons", rho=0.9, group_by=("sex", "age_band"))
    envelope.query = canonical_bytes(bigger)
    err = _execute(_node_stub(fed, _analyst(fed)), envelope)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "signature does not match" in (err.details() or "")


@pytest.mark.usefixtures("unchanged_budget")
def test_hub_forging_an_analyst_query(fed: LocalFederation) -> None:
    hub = _identity(fed, Role.HUB, HUB_NAME)
    stub = _node_stub(fed, hub)
    key = serialization.load_pem_private_key(hub.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = now_ms()
    fields = {
        "query": canonical_bytes(QUERY),
        "analyst": "demo-analyst",
        "nonce": b"n" * 16,
        "issued_at_ms": now,
        "expires_at_ms": now + 60_000,
    }
    payload = signed_payload(
        **fields,  # type: ignore[arg-type]
        operation=Operation.EXECUTE,
        audience=Audience(hub=HUB_NAME),
    )
    signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    # 1. With its own certificate: not an analyst certificate.
    own = node_pb2.QueryEnvelope(
        **fields,  # type: ignore[arg-type]
        analyst_certificate=hub.cert_pem,
        signature_algorithm=SIGNATURE_ALGORITHM,
        signature=signature,
        payload_version=PAYLOAD_VERSION,
        operation=node_pb2.OPERATION_EXECUTE,
        audience=node_pb2.Audience(hub=HUB_NAME),
    )
    err = _execute(stub, own)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    # 2. With the analyst's (public) certificate but the hub's key: the signature fails.
    borrowed = node_pb2.QueryEnvelope()
    borrowed.CopyFrom(own)
    borrowed.analyst_certificate = _analyst(fed).cert_pem
    err = _execute(stub, borrowed)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "signature does not match" in (err.details() or "")


def test_replay_after_a_node_restart(fed: LocalFederation) -> None:
    """Kept releases and used nonces survive a restart (both are in the ledger file)."""
    envelope = serde.signed_query_to_proto(_signed(fed))
    stub = _node_stub(fed, _analyst(fed))
    first = stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    fed.restart_node(NODE)
    before = _spent(fed)
    stub = _node_stub(fed, _analyst(fed))
    again = stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    assert again.resent
    assert again.table == first.table
    assert again.ledger_sequence == first.ledger_sequence
    err = _execute(stub, _same_nonce(fed, envelope))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (err.details() or "")
    assert _spent(fed) == before
