"""Attacks on a real federation (nodes and hub processes, mutual TLS on loopback).

Each attack asserts the refusal (status code and a message that says what to fix) and that
no node's budget moved. Threat model: docs/threat-model.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.analyst.client import BUDGET_PROBE, Federation, HubUnavailableError
from coordinator.audit import ledgers as audit
from coordinator.local import synth
from coordinator.local.federation import AUDITOR_NAME, HUB_NAME, LocalFederation, NodeSetup
from node.budget.accounting import Charge
from node.budget.ledger import SqliteLedger
from protocols import revocation, security, serde
from protocols.budget.policy import BudgetPolicy
from protocols.v1 import hub_pb2, hub_pb2_grpc, node_pb2, node_pb2_grpc
from queries.errors import ConfigError, PermissionDeniedError, QueryError
from queries.mechanisms import rho_to_epsilon
from queries.spec import Filter, Query, canonical_bytes
from queries.sql import parse_sql

pytestmark = pytest.mark.integration

NODE = "nwc"
# Only the demo analyst and "limited" may query; "limited" may only see copd.
ACCESS = """
[access]
analysts = ["demo-analyst", "limited", "revoked-analyst"]
[access.analyst_views]
limited = ["copd"]
"""


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("attacks")
    folders = synth.generate_federation(4_000, root / "data", seed=3)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], extra_toml=ACCESS) for r in synth.REGIONS
    )
    federation = LocalFederation(workdir=root, nodes=setups, deadline_ms=5_000)
    federation.create_pki()
    for name in ("limited", "revoked-analyst", "outsider"):
        security.issue(federation.pki, role=security.Role.ANALYST, name=name)
    with federation:
        yield federation


def _identity(fed: LocalFederation, role: security.Role, name: str) -> security.Identity:
    return security.load_identity(fed.identity_dir(role, name))


def _analyst(fed: LocalFederation, name: str = "demo-analyst") -> security.Identity:
    return _identity(fed, security.Role.ANALYST, name)


def _node_stub(fed: LocalFederation, identity: security.Identity) -> node_pb2_grpc.NodeStub:
    channel = security.secure_channel(
        f"127.0.0.1:{fed.node_port(NODE)}", identity, server_name=NODE
    )
    return node_pb2_grpc.NodeStub(channel)


def _spent(fed: LocalFederation) -> dict[str, float]:
    auditor = _identity(fed, security.Role.AUDITOR, AUDITOR_NAME)
    out = {}
    for setup in fed.nodes:
        channel = security.secure_channel(
            f"127.0.0.1:{fed.node_port(setup.name)}", auditor, server_name=setup.name
        )
        out[setup.name] = (
            node_pb2_grpc.NodeStub(channel)
            .Describe(node_pb2.DescribeRequest(), timeout=10)
            .budget.rho_spent
        )
        channel.close()
    return out


@pytest.fixture
def unchanged_budget(fed: LocalFederation) -> Iterator[None]:
    """Every attack must leave every node's budget exactly where it was."""
    before = _spent(fed)
    yield
    assert _spent(fed) == before


def _execute(stub: node_pb2_grpc.NodeStub, envelope: node_pb2.QueryEnvelope) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    return info.value


QUERY = Query(view="persons", rho=0.05, group_by=("sex",))


def _signed(fed: LocalFederation, query: Query = QUERY, **kw: int) -> security.SignedQuery:
    return security.sign_query(_analyst(fed), canonical_bytes(query), **kw)


def _refusal_logged(fed: LocalFederation, code: str) -> bool:
    """True if the node's ledger holds a zero-cost refusal with this status code."""
    stub = _node_stub(fed, _identity(fed, security.Role.AUDITOR, AUDITOR_NAME))
    for entry in stub.StreamLedger(node_pb2.LedgerRequest(from_sequence=1), timeout=10):
        body = json.loads(entry.body)
        if body.get("outcome") == "refused" and body.get("code") == code:
            assert body.get("rho", 0) == 0
            return True
    return False


@pytest.mark.usefixtures("unchanged_budget")
def test_no_client_certificate(fed: LocalFederation) -> None:
    ca = (fed.pki / security.CA_FILE).read_bytes()
    for address, name in ((f"127.0.0.1:{fed.node_port(NODE)}", NODE), (fed.hub_address, "hub")):
        channel = grpc.secure_channel(
            address,
            grpc.ssl_channel_credentials(root_certificates=ca),
            options=(("grpc.ssl_target_name_override", name),),
        )
        with pytest.raises(grpc.RpcError) as info:
            node_pb2_grpc.NodeStub(channel).Describe(node_pb2.DescribeRequest(), timeout=5)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        channel.close()


@pytest.mark.usefixtures("unchanged_budget")
def test_certificate_from_another_ca(fed: LocalFederation, tmp_path: Path) -> None:
    security.create_ca(tmp_path)
    rogue = security.load_identity(
        security.issue(tmp_path, role=security.Role.ANALYST, name="demo-analyst")
    )
    forged = security.Identity(
        rogue.name, rogue.role, rogue.cert_pem, rogue.key_pem, _analyst(fed).ca_pem
    )
    with Federation(fed.hub_address, forged) as client, pytest.raises(HubUnavailableError):
        client.query(QUERY)
    # And an envelope signed by the rogue CA's analyst, relayed by a genuine connection:
    signed = security.sign_query(rogue, canonical_bytes(QUERY))
    err = _execute(_node_stub(fed, _analyst(fed)), serde.signed_query_to_proto(signed))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "not issued by this federation's CA" in (err.details() or "")


@pytest.mark.usefixtures("unchanged_budget")
def test_revoked_analyst(fed: LocalFederation) -> None:
    revocation.revoke(fed.pki, "revoked-analyst", reason="left the project")
    time.sleep(2.5)  # nodes and the hub re-read the CRL when it changes (checked every 2 s)
    ident = _analyst(fed, "revoked-analyst")
    with (
        Federation(fed.hub_address, ident) as client,
        pytest.raises(security.AuthenticationError, match="revoked"),
    ):
        client.query(QUERY)
    err = _execute(
        _node_stub(fed, _analyst(fed)),
        serde.signed_query_to_proto(security.sign_query(ident, canonical_bytes(QUERY))),
    )
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (err.details() or "")


@pytest.mark.usefixtures("unchanged_budget")
def test_expired_envelope(fed: LocalFederation) -> None:
    signed = _signed(fed, ttl_ms=1)
    time.sleep(0.05)
    err = _execute(_node_stub(fed, _analyst(fed)), serde.signed_query_to_proto(signed))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (err.details() or "")
    assert _refusal_logged(fed, "UNAUTHENTICATED")


def test_replayed_envelope(fed: LocalFederation) -> None:
    stub = _node_stub(fed, _analyst(fed))
    envelope = serde.signed_query_to_proto(_signed(fed))
    stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    before = _spent(fed)
    err = _execute(stub, envelope)
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
    hub = _identity(fed, security.Role.HUB, HUB_NAME)
    stub = _node_stub(fed, hub)
    key = serialization.load_pem_private_key(hub.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = security.now_ms()
    fields = {
        "query": canonical_bytes(QUERY),
        "analyst": "demo-analyst",
        "nonce": b"n" * 16,
        "issued_at_ms": now,
        "expires_at_ms": now + 60_000,
    }
    payload = security.signed_payload(
        **fields,  # type: ignore[arg-type]
        operation=security.Operation.EXECUTE,
        audience=security.Audience(hub=HUB_NAME),
    )
    signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    # 1. With its own certificate: not an analyst certificate.
    own = node_pb2.QueryEnvelope(
        **fields,  # type: ignore[arg-type]
        analyst_certificate=hub.cert_pem,
        signature_algorithm=security.SIGNATURE_ALGORITHM,
        signature=signature,
        payload_version=security.PAYLOAD_VERSION,
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


@pytest.mark.usefixtures("unchanged_budget")
def test_analyst_calling_the_auditor_stream(fed: LocalFederation) -> None:
    stub = _node_stub(fed, _analyst(fed))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamLedger(node_pb2.LedgerRequest(), timeout=10))
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "only auditors" in (info.value.details() or "")


@pytest.mark.usefixtures("unchanged_budget")
def test_auditor_submitting_a_query(fed: LocalFederation) -> None:
    auditor = _identity(fed, security.Role.AUDITOR, AUDITOR_NAME)
    envelope = serde.signed_query_to_proto(_signed(fed))
    err = _execute(_node_stub(fed, auditor), envelope)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    channel = security.secure_channel(fed.hub_address, auditor, server_name="hub")
    with pytest.raises(grpc.RpcError) as info:
        hub_pb2_grpc.HubStub(channel).Submit(hub_pb2.SubmitRequest(envelope=envelope), timeout=10)
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.usefixtures("unchanged_budget")
def test_oversized_message(fed: LocalFederation) -> None:
    ident = _analyst(fed)
    creds = grpc.ssl_channel_credentials(ident.ca_pem, ident.key_pem, ident.cert_pem)
    channel = grpc.secure_channel(
        f"127.0.0.1:{fed.node_port(NODE)}",
        creds,
        options=(
            ("grpc.ssl_target_name_override", NODE),
            ("grpc.max_send_message_length", 80 * 1024 * 1024),
        ),
    )
    envelope = serde.signed_query_to_proto(_signed(fed))
    envelope.analyst_certificate = b"x" * (security.MAX_MESSAGE_BYTES + 1024)
    err = _execute(node_pb2_grpc.NodeStub(channel), envelope)
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    channel.close()


@pytest.mark.usefixtures("unchanged_budget")
@pytest.mark.parametrize(
    "attack",
    [
        "SELECT sex, COUNT(*) FROM persons WHERE sex = 'x'' OR ''1''=''1' GROUP BY sex",
        "SELECT COUNT(*) FROM persons WHERE sex IN ('female'); DROP TABLE persons; --')",
        'SELECT COUNT(*) FROM "persons; DROP TABLE persons"',
        "SELECT COUNT(*) FROM read_parquet('/etc/passwd')",
        'SELECT COUNT(*) FROM persons GROUP BY "sex""; --"',
    ],
)
def test_sql_injection_is_refused(fed: LocalFederation, attack: str) -> None:
    with Federation(fed.hub_address, _analyst(fed)) as client, pytest.raises(QueryError):
        client.query(parse_sql(attack, rho=0.05))


@pytest.mark.usefixtures("unchanged_budget")
def test_injection_in_a_spec_filter_value_is_refused_by_the_node(fed: LocalFederation) -> None:
    query = Query(view="persons", rho=0.05, where=(Filter("sex", ("female' OR '1'='1",)),))
    with (
        Federation(fed.hub_address, _analyst(fed)) as client,
        pytest.raises(QueryError, match="not in its public domain"),
    ):
        client.query(query)


@pytest.mark.usefixtures("unchanged_budget")
def test_node_access_policy(fed: LocalFederation) -> None:
    with (
        Federation(fed.hub_address, _analyst(fed, "outsider")) as client,
        pytest.raises(PermissionDeniedError, match="not on this node's access list"),
    ):
        client.query(QUERY)
    with (
        Federation(fed.hub_address, _analyst(fed, "limited")) as client,
        pytest.raises(PermissionDeniedError, match="may not query view 'persons'"),
    ):
        client.query(QUERY)


def test_limited_analyst_may_query_their_view(fed: LocalFederation) -> None:
    with Federation(fed.hub_address, _analyst(fed, "limited")) as client:
        result = client.query(Query(view="copd", rho=0.01))
    assert not result.partial


def test_path_traversal_in_names_and_config(tmp_path: Path) -> None:
    security.create_ca(tmp_path / "pki")
    for bad in ("../../etc/x", "a/b", ".hidden", "x" * 65, ""):
        with pytest.raises(ConfigError):
            security.issue(tmp_path / "pki", role=security.Role.ANALYST, name=bad)
    from queries.pathway import parse_pathway

    with pytest.raises(ConfigError, match=r"pathway name|not a valid name"):
        parse_pathway("name: ../../etc\nconditions: [1]\n", "evil.yaml")


def test_replay_after_a_node_restart(fed: LocalFederation) -> None:
    """Nonces of released queries survive a restart (they are re-read from the ledger)."""
    envelope = serde.signed_query_to_proto(_signed(fed))
    _node_stub(fed, _analyst(fed)).Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    fed.restart_node(NODE)
    before = _spent(fed)
    err = _execute(_node_stub(fed, _analyst(fed)), envelope)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in (err.details() or "")
    assert _spent(fed) == before


def test_calling_a_node_directly_bypasses_no_disclosure_rule(fed: LocalFederation) -> None:
    """Suppression and rounding used to run only at the hub; a node now applies its own.

    By sex x age band x deceased, a 4,000-person region has many cells with a handful of
    persons; straight from the node, each cell is either withheld (null) or a multiple of 5
    of at least 8 (the demo node's [release] rules: suppress below 8, round to 5).
    """
    query = Query(view="persons", rho=0.5, group_by=("sex", "age_band", "deceased"))
    envelope = serde.signed_query_to_proto(_signed(fed, query))
    reply = _node_stub(fed, _analyst(fed)).Execute(
        node_pb2.ExecuteRequest(envelope=envelope), timeout=10
    )
    release = serde.release_from_proto(reply)
    values = release.table.column("value").to_pylist()
    assert release.rules is not None
    assert None in values  # small cells exist and are withheld
    shown = [v for v in values if v is not None]
    assert shown
    assert all(v >= 8 and v % 5 == 0 for v in shown), shown


# ---- what a signed envelope authorises: its operation and its audience ----------------------


def _node_at(
    fed: LocalFederation, node: str, identity: security.Identity
) -> node_pb2_grpc.NodeStub:
    channel = security.secure_channel(
        f"127.0.0.1:{fed.node_port(node)}", identity, server_name=node
    )
    return node_pb2_grpc.NodeStub(channel)


def _refused_with(fed: LocalFederation, reason: str) -> bool:
    """True if the node's ledger holds a zero-cost UNAUTHENTICATED refusal giving reason."""
    stub = _node_stub(fed, _identity(fed, security.Role.AUDITOR, AUDITOR_NAME))
    for entry in stub.StreamLedger(node_pb2.LedgerRequest(from_sequence=1), timeout=10):
        body = json.loads(entry.body)
        if body.get("outcome") == "refused" and reason in str(body.get("reason")):
            assert body.get("code") == "UNAUTHENTICATED"
            assert body.get("rho", 0) == 0
            return True
    return False


def _hub(fed: LocalFederation, identity: security.Identity) -> hub_pb2_grpc.HubStub:
    channel = security.secure_channel(fed.hub_address, identity, server_name=HUB_NAME)
    return hub_pb2_grpc.HubStub(channel)


def _version_1_envelope(analyst: security.Identity, query: bytes) -> node_pb2.QueryEnvelope:
    """An envelope as chc signed them before payload version 2: no operation, no audience."""
    key = serialization.load_pem_private_key(analyst.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = security.now_ms()
    nonce = os.urandom(16)
    payload = security.legacy_signed_payload(
        query=query, analyst=analyst.name, nonce=nonce, issued_at_ms=now, expires_at_ms=now + 60_000
    )
    return node_pb2.QueryEnvelope(
        query=query,
        analyst=analyst.name,
        nonce=nonce,
        issued_at_ms=now,
        expires_at_ms=now + 60_000,
        analyst_certificate=analyst.cert_pem,
        signature_algorithm=security.SIGNATURE_ALGORITHM,
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
        envelope = client.sign(QUERY, operation=security.Operation.EXPLAIN)
    # What it was signed for works, through the hub, at every node...
    explained = _explain_all(fed, envelope)
    assert {status for status, _ in explained.values()} == {"ok"}, explained
    # ...and the hub refuses early to submit it for execution.
    err = _submit_refused(fed, envelope)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "not to execute it" in (err.details() or "")
    hub = _identity(fed, security.Role.HUB, HUB_NAME)
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
        envelope = client.sign(BUDGET_PROBE, operation=security.Operation.BUDGET)
    hub = _identity(fed, security.Role.HUB, HUB_NAME)
    stub = _node_stub(fed, hub)
    assert stub.Explain(node_pb2.ExecuteRequest(envelope=envelope), timeout=10).rho > 0
    err = _execute(stub, envelope)
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "as a budget probe (`chc budget`), not to execute it" in (err.details() or "")
    assert _refused_with(fed, "as a budget probe (`chc budget`), not to execute it")


@pytest.mark.usefixtures("unchanged_budget")
def test_an_envelope_relayed_by_a_hub_it_does_not_name(fed: LocalFederation) -> None:
    other_hub = security.load_identity(
        security.issue(fed.pki, role=security.Role.HUB, name="other-hub")
    )
    with Federation(fed.hub_address, _analyst(fed)) as client:
        envelope = client.sign(QUERY)  # addressed to the federation's hub, "hub"
        explain = client.sign(QUERY, operation=security.Operation.EXPLAIN)
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
    err = _execute(_node_stub(fed, _identity(fed, security.Role.HUB, HUB_NAME)), direct)
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
        explain = client.sign(QUERY, operation=security.Operation.EXPLAIN, nodes=("nenc",))
    explained = _explain_all(fed, explain)
    assert explained["nenc"][0] == "ok"
    for node in ("nwc", "yh", "gm"):
        status, message = explained[node]
        assert status == "refused"
        assert f"addressed to node(s) nenc, not to '{node}'" in message
    hub = _identity(fed, security.Role.HUB, HUB_NAME)
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
    for caller in (_analyst(fed), _identity(fed, security.Role.HUB, HUB_NAME)):
        err = _execute(_node_stub(fed, caller), envelope)
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "version-1 format" in (err.details() or "")
        assert "sign the query again" in (err.details() or "")
    assert _refused_with(fed, "version-1 format")


def test_the_auditor_names_a_release_its_envelope_did_not_authorise(tmp_path: Path) -> None:
    """A node that released under an explain or budget envelope, or outside the envelope's
    nodes, cannot hide it: the auditor verifies every envelope in the payload version it was
    signed in (version 1 too, which older ledgers hold) and what it authorised."""
    security.create_ca(tmp_path / "pki")
    alice = security.load_identity(
        security.issue(tmp_path / "pki", role=security.Role.ANALYST, name="alice")
    )
    path = tmp_path / "nwc.ledger.sqlite"
    ledger = SqliteLedger(path, node="nwc", policy=BudgetPolicy())
    query = canonical_bytes(Query(view="persons", rho=0.1))
    op = security.Operation
    envelopes = [  # entries 2 to 6 (entry 1 is the node's budget policy)
        _version_1_envelope(alice, query),
        _signed_for(alice, query, op.EXECUTE, security.Audience(HUB_NAME)),
        _signed_for(alice, query, op.EXPLAIN, security.Audience(HUB_NAME)),
        _signed_for(alice, query, op.BUDGET, security.Audience(HUB_NAME)),
        _signed_for(alice, query, op.EXECUTE, security.Audience(HUB_NAME, ("nenc",))),
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
    result = audit.verify(audit.open_file(path), ca_pem=(tmp_path / "pki" / "ca.pem").read_bytes())
    assert {a.entry: a.problem for a in result.anomalies} == {
        4: "was released under an envelope the analyst signed for explain, not to execute",
        5: "was released under an envelope the analyst signed for budget, not to execute",
        6: "was released by node 'nwc', which the analyst's envelope does not address "
        "(it names nenc)",
    }
    assert any("version-1 envelopes (the first: entry 2)" in n for n in result.notes)


def _signed_for(
    analyst: security.Identity,
    query: bytes,
    operation: security.Operation,
    audience: security.Audience,
) -> node_pb2.QueryEnvelope:
    signed = security.sign_query(analyst, query, operation=operation, audience=audience)
    return serde.signed_query_to_proto(signed)


# ---- bounded work (docs/threat-model.md, "Bounded work") ------------------------------------


def _ledger_bodies(fed: LocalFederation) -> list[dict[str, object]]:
    stub = _node_stub(fed, _identity(fed, security.Role.AUDITOR, AUDITOR_NAME))
    stream = stub.StreamLedger(node_pb2.LedgerRequest(from_sequence=1), timeout=30)
    return [json.loads(e.body) for e in stream if not e.head]


def _ledger_bytes(fed: LocalFederation) -> int:
    folder = fed.workdir / "conf"
    return sum(p.stat().st_size for p in folder.glob(f"{NODE}.ledger.sqlite*"))


@pytest.mark.usefixtures("unchanged_budget")
def test_a_5_mb_junk_envelope_from_an_auditor_costs_the_ledger_a_few_kb(
    fed: LocalFederation,
) -> None:
    auditor = _identity(fed, security.Role.AUDITOR, AUDITOR_NAME)
    junk = node_pb2.QueryEnvelope(
        query=b'{"view": "' + b"x" * (3 * 1024 * 1024) + b'"}',
        analyst="j" * 100_000,
        analyst_certificate=b"\x00" * (2 * 1024 * 1024),
    )
    assert junk.ByteSize() > 5 * 1024 * 1024
    before = _ledger_bytes(fed)
    err = _execute(_node_stub(fed, auditor), junk)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(err.details() or "") < 2000
    grown = _ledger_bytes(fed) - before
    assert grown < 64 * 1024, f"the ledger grew by {grown} bytes"  # it was 12 MB
    body = _ledger_bodies(fed)[-1]
    assert body["code"] == "PERMISSION_DENIED"
    assert "envelope" not in body
    assert body["envelope_size"] == junk.ByteSize()
    assert body["query_truncated"] is True
    assert len(json.dumps(body)) < 8 * 1024


def test_repeated_refusals_are_rate_limited_and_recorded_once(fed: LocalFederation) -> None:
    """A peer refused again and again: 30 refusals recorded, then one entry saying rate
    limiting started, then answers (same code, saying so) that the ledger does not grow by."""
    from node.config import REFUSALS_PER_WINDOW

    name = "flooder"
    security.issue(fed.pki, role=security.Role.ANALYST, name=name)
    stub = _node_stub(fed, _analyst(fed, name))
    junk = node_pb2.QueryEnvelope(query=b"{}", analyst=name, nonce=b"n" * 16)
    details = []
    for _ in range(REFUSALS_PER_WINDOW + 10):
        err = _execute(stub, junk)
        assert err.code() is grpc.StatusCode.UNAUTHENTICATED
        details.append(err.details() or "")
    assert not any("rate-limiting" in d for d in details[:REFUSALS_PER_WINDOW])
    assert f"now rate-limiting refusals from {name}" in details[REFUSALS_PER_WINDOW]
    assert all("not recorded in its ledger" in d for d in details[REFUSALS_PER_WINDOW + 1 :])
    mine = [b for b in _ledger_bodies(fed) if b.get("analyst") == name]
    assert len(mine) == REFUSALS_PER_WINDOW + 1
    limited = [b["rate_limited"] for b in mine if "rate_limited" in b]
    assert len(limited) == 1
    assert limited[0]["peer"] == name  # type: ignore[index]
    assert limited[0]["refusals"] == REFUSALS_PER_WINDOW  # type: ignore[index]
    assert mine[-1]["reason"] == details[REFUSALS_PER_WINDOW]
    # Others are still recorded.
    expired = serde.signed_query_to_proto(_signed(fed, ttl_ms=1))
    time.sleep(0.05)
    before = len(_ledger_bodies(fed))
    assert "rate-limiting" not in (
        _execute(_node_stub(fed, _analyst(fed)), expired).details() or ""
    )
    assert len(_ledger_bodies(fed)) == before + 1


def _run_node(command: str, config: Path, *extra: str) -> tuple[int, str]:
    import subprocess
    import sys

    run = subprocess.run(  # our own interpreter and module
        [sys.executable, "-m", "node", command, "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return run.returncode, run.stdout + run.stderr


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../../evil", "is not a valid node name"),
        ("/tmp/chc-evil", "is not a valid node name"),  # noqa: S108 - never written
        ("york", "name 'york' does not match the node's certificate, which is issued to 'nwc'"),
    ],
)
def test_a_node_misnamed_or_not_named_as_its_certificate_does_not_start(
    fed: LocalFederation, tmp_path: Path, name: str, words: str
) -> None:
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    config = folder / "node.toml"
    identity = fed.identity_dir(security.Role.NODE, NODE).resolve()
    config.write_text(
        f'name = "{name}"\nomop = "{fed.nodes[1].omop.resolve()}"\nidentity = "{identity}"\n'
        'listen = "127.0.0.1:0"\n'
    )
    code, output = _run_node("check", config)
    assert code != 0
    assert words in output
    assert "is ready" not in output
    ready = tmp_path / "ready.json"
    code, output = _run_node("serve", config, "--ready-file", str(ready))
    assert code != 0
    assert words in output
    assert not ready.exists()
    # No ledger anywhere: not in the folder, not two folders up, not at an absolute path.
    assert not list(tmp_path.rglob("*.sqlite*"))
    assert not Path("/tmp/chc-evil.ledger.sqlite").exists()  # noqa: S108
