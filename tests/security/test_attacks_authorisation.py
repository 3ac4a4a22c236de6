"""Attacks on what a signed envelope authorises: its operation, its audience, its version.

Each attack asserts the refusal (status code and a message that says what to fix) and that
no node's budget moved. Threat model: docs/threat-model.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.analyst.client import BUDGET_PROBE, Federation
from coordinator.audit.sources import open_file
from coordinator.audit.verification import verify
from coordinator.local.federation import AUDITOR_NAME, HUB_NAME, LocalFederation
from node.budget.accounting import Charge
from node.budget.ledger import SqliteLedger
from protocols import serde
from protocols.budget.policy import BudgetPolicy
from protocols.security.envelope import (
    SIGNATURE_ALGORITHM,
    Audience,
    Operation,
    legacy_signed_payload,
    now_ms,
    sign_query,
)
from protocols.security.pki import Identity, Role, create_ca, issue, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import hub_pb2, hub_pb2_grpc, node_pb2, node_pb2_grpc
from queries.mechanisms import rho_to_epsilon
from queries.spec import Query, canonical_bytes
from tests.security._attack_helpers import (
    NODE,
    QUERY,
    _analyst,
    _execute,
    _identity,
    _node_stub,
    _signed,
)

pytestmark = pytest.mark.integration


# ---- what a signed envelope authorises: its operation and its audience ----------------------


def _node_at(fed: LocalFederation, node: str, identity: Identity) -> node_pb2_grpc.NodeStub:
    channel = secure_channel(f"127.0.0.1:{fed.node_port(node)}", identity, server_name=node)
    return node_pb2_grpc.NodeStub(channel)


def _refused_with(fed: LocalFederation, reason: str) -> bool:
    """True if the node's ledger holds a zero-cost UNAUTHENTICATED refusal giving reason."""
    stub = _node_stub(fed, _identity(fed, Role.AUDITOR, AUDITOR_NAME))
    for entry in stub.StreamLedger(node_pb2.LedgerRequest(from_sequence=1), timeout=10):
        body = json.loads(entry.body)
        if body.get("outcome") == "refused" and reason in str(body.get("reason")):
            assert body.get("code") == "UNAUTHENTICATED"
            assert body.get("rho", 0) == 0
            return True
    return False


def _hub(fed: LocalFederation, identity: Identity) -> hub_pb2_grpc.HubStub:
    channel = secure_channel(fed.hub_address, identity, server_name=HUB_NAME)
    return hub_pb2_grpc.HubStub(channel)


def _version_1_envelope(analyst: Identity, query: bytes) -> node_pb2.QueryEnvelope:
    """An envelope as chc signed them before payload version 2: no operation, no audience."""
    key = serialization.load_pem_private_key(analyst.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = now_ms()
    nonce = os.urandom(16)
    payload = legacy_signed_payload(
        query=query, analyst=analyst.name, nonce=nonce, issued_at_ms=now, expires_at_ms=now + 60_000
    )
    return node_pb2.QueryEnvelope(
        query=query,
        analyst=analyst.name,
        nonce=nonce,
        issued_at_ms=now,
        expires_at_ms=now + 60_000,
        analyst_certificate=analyst.cert_pem,
        signature_algorithm=SIGNATURE_ALGORITHM,
        signature=key.sign(payload, ec.ECDSA(hashes.SHA256())),
    )


def _explain_all(
    fed: LocalFederation, envelope: node_pb2.QueryEnvelope
) -> dict[str, tuple[str, str]]:
    """Each node's (status, message) for the hub's Explain of envelope, as the analyst."""
    request = hub_pb2.SubmitRequest(envelope=envelope)
    reply = _hub(fed, _analyst(fed)).Explain(request, timeout=30)
    return {n.node: (n.status, n.message) for n in reply.nodes}


def _submit_refused(fed: LocalFederation, envelope: node_pb2.QueryEnvelope) -> grpc.RpcError:
    """The hub's refusal to submit envelope, sent by the analyst who signed it."""
    with pytest.raises(grpc.RpcError) as info:
        _hub(fed, _analyst(fed)).Submit(hub_pb2.SubmitRequest(envelope=envelope), timeout=30)
    return info.value


@pytest.mark.usefixtures("unchanged_budget")
def test_hub_executing_an_analysts_explain_envelope(fed: LocalFederation) -> None:
    """The envelope of `chc query --explain`, sent by the hub to a node's Execute."""
    with Federation(fed.hub_address, _analyst(fed)) as client:
        envelope = client.sign(QUERY, operation=Operation.EXPLAIN)
    # What it was signed for works, through the hub, at every node...
    explained = _explain_all(fed, envelope)
    assert {status for status, _ in explained.values()} == {"ok"}, explained
    # ...and the hub refuses early to submit it for execution.
    err = _submit_refused(fed, envelope)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "not to execute it" in (err.details() or "")
    hub = _identity(fed, Role.HUB, HUB_NAME)
    err = _execute(_node_stub(fed, hub), envelope)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    details = err.details() or ""
    assert "signed this envelope to explain the query" in details
    assert "not to execute it" in details
    assert "sign it for execute" in details
    assert _refused_with(fed, "to explain the query (`chc query --explain`), not to execute")


@pytest.mark.usefixtures("unchanged_budget")
def test_hub_executing_the_budget_probe(fed: LocalFederation) -> None:
    """The probe `chc budget` signs, sent by the hub to a node's Execute."""
    with Federation(fed.hub_address, _analyst(fed)) as client:
        budgets = client.budget()
        assert all(b.analyst is not None for b in budgets), budgets  # the probe works
        envelope = client.sign(BUDGET_PROBE, operation=Operation.BUDGET)
    hub = _identity(fed, Role.HUB, HUB_NAME)
    stub = _node_stub(fed, hub)
    assert stub.Explain(node_pb2.ExecuteRequest(envelope=envelope), timeout=10).rho > 0
    err = _execute(stub, envelope)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "as a budget probe (`chc budget`), not to execute it" in (err.details() or "")
    assert _refused_with(fed, "as a budget probe (`chc budget`), not to execute it")


@pytest.mark.usefixtures("unchanged_budget")
def test_an_envelope_relayed_by_a_hub_it_does_not_name(fed: LocalFederation) -> None:
    other_hub = load_identity(issue(fed.pki, role=Role.HUB, name="other-hub"))
    with Federation(fed.hub_address, _analyst(fed)) as client:
        envelope = client.sign(QUERY)  # addressed to the federation's hub, "hub"
        explain = client.sign(QUERY, operation=Operation.EXPLAIN)
    stub = _node_stub(fed, other_hub)
    err = _execute(stub, envelope)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "addressed to hub 'hub', not to hub 'other-hub'" in (err.details() or "")
    assert _refused_with(fed, "not to hub 'other-hub' that relayed it")
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(node_pb2.ExecuteRequest(envelope=explain), timeout=10)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    # An envelope addressed to no hub (sign_query's default) is for direct calls only.
    direct = serde.signed_query_to_proto(_signed(fed))
    err = _execute(_node_stub(fed, _identity(fed, Role.HUB, HUB_NAME)), direct)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "no hub may relay it" in (err.details() or "")
    err = _submit_refused(fed, direct)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "no hub may relay it" in (err.details() or "")
    # And another analyst presenting it straight to the node.
    err = _execute(_node_stub(fed, _analyst(fed, "limited")), envelope)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "only submit envelopes it signed itself" in (err.details() or "")


@pytest.mark.usefixtures("unchanged_budget")
def test_a_node_outside_the_node_audience_refuses(fed: LocalFederation) -> None:
    with Federation(fed.hub_address, _analyst(fed)) as client:
        envelope = client.sign(QUERY, nodes=("nenc",))
        explain = client.sign(QUERY, operation=Operation.EXPLAIN, nodes=("nenc",))
    explained = _explain_all(fed, explain)
    assert explained["nenc"][0] == "ok"
    for node in ("nwc", "yh", "gm"):
        status, message = explained[node]
        assert status == "refused"
        assert f"addressed to node(s) nenc, not to '{node}'" in message
    hub = _identity(fed, Role.HUB, HUB_NAME)
    for caller in (hub, _analyst(fed)):  # relayed, or presented by the analyst itself
        err = _execute(_node_stub(fed, caller), envelope)
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert f"addressed to node(s) nenc, not to '{NODE}'" in (err.details() or "")
    assert _refused_with(fed, f"not to '{NODE}'; sign it for this node")
    # The node it names accepts it (Explain, so that no budget moves).
    reply = _node_at(fed, "nenc", hub).Explain(
        node_pb2.ExecuteRequest(envelope=explain), timeout=10
    )
    assert reply.rho > 0


@pytest.mark.usefixtures("unchanged_budget")
def test_an_envelope_in_the_version_1_format_is_refused(fed: LocalFederation) -> None:
    """Version 1 signed no operation and no audience: it could be used for anything."""
    envelope = _version_1_envelope(_analyst(fed), canonical_bytes(QUERY))
    for caller in (_analyst(fed), _identity(fed, Role.HUB, HUB_NAME)):
        err = _execute(_node_stub(fed, caller), envelope)
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "version-1 format" in (err.details() or "")
        assert "sign the query again" in (err.details() or "")
    assert _refused_with(fed, "version-1 format")


def test_the_auditor_names_a_release_its_envelope_did_not_authorise(tmp_path: Path) -> None:
    """A node that released under an explain or budget envelope, or outside the envelope's
    nodes, cannot hide it: the auditor verifies every envelope in the payload version it was
    signed in (version 1 too, which older ledgers hold) and what it authorised."""
    create_ca(tmp_path / "pki")
    alice = load_identity(issue(tmp_path / "pki", role=Role.ANALYST, name="alice"))
    path = tmp_path / "nwc.ledger.sqlite"
    ledger = SqliteLedger(path, node="nwc", policy=BudgetPolicy())
    query = canonical_bytes(Query(view="persons", rho=0.1))
    op = Operation
    envelopes = [  # entries 2 to 6 (entry 1 is the node's budget policy)
        _version_1_envelope(alice, query),
        _signed_for(alice, query, op.EXECUTE, Audience(HUB_NAME)),
        _signed_for(alice, query, op.EXPLAIN, Audience(HUB_NAME)),
        _signed_for(alice, query, op.BUDGET, Audience(HUB_NAME)),
        _signed_for(alice, query, op.EXECUTE, Audience(HUB_NAME, ("nenc",))),
    ]
    for envelope in envelopes:
        ledger.charge(
            Charge(
                query_id=envelope.nonce.hex(),
                analyst="alice",
                query=query,
                envelope=envelope.SerializeToString(deterministic=True),
                views=("persons",),
                rho=0.1,
                epsilon=rho_to_epsilon(0.1, BudgetPolicy().delta),
            )
        )
    ledger.close()
    result = verify(open_file(path), ca_pem=(tmp_path / "pki" / "ca.pem").read_bytes())
    assert {a.entry: a.problem for a in result.anomalies} == {
        4: "was released under an envelope the analyst signed for explain, not to execute",
        5: "was released under an envelope the analyst signed for budget, not to execute",
        6: "was released by node 'nwc', which the analyst's envelope does not address "
        "(it names nenc)",
    }
    assert any("version-1 envelopes (the first: entry 2)" in n for n in result.notes)


def _signed_for(
    analyst: Identity,
    query: bytes,
    operation: Operation,
    audience: Audience,
) -> node_pb2.QueryEnvelope:
    signed = sign_query(analyst, query, operation=operation, audience=audience)
    return serde.signed_query_to_proto(signed)
