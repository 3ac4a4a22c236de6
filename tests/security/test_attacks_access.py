"""Attacks on who may connect and call what: certificates, roles, access lists, the hub.

Each attack asserts the refusal (status code and a message that says what to fix) and that
no node's budget moved. Threat model: docs/threat-model.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from coordinator.analyst.client import Federation, HubUnavailableError
from coordinator.local.federation import AUDITOR_NAME, LocalFederation
from protocols import revocation, serde
from protocols.security.envelope import sign_query
from protocols.security.pki import CA_FILE, Identity, Role, create_ca, issue, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import hub_pb2, hub_pb2_grpc, node_pb2, node_pb2_grpc
from queries.errors import AuthenticationError, PermissionDeniedError
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


@pytest.mark.usefixtures("unchanged_budget")
def test_no_client_certificate(fed: LocalFederation) -> None:
    ca = (fed.pki / CA_FILE).read_bytes()
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
    create_ca(tmp_path)
    rogue = load_identity(issue(tmp_path, role=Role.ANALYST, name="demo-analyst"))
    forged = Identity(rogue.name, rogue.role, rogue.cert_pem, rogue.key_pem, _analyst(fed).ca_pem)
    with Federation(fed.hub_address, forged) as client, pytest.raises(HubUnavailableError):
        client.query(QUERY)
    # And an envelope signed by the rogue CA's analyst, relayed by a genuine connection:
    signed = sign_query(rogue, canonical_bytes(QUERY))
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
        pytest.raises(AuthenticationError, match="revoked"),
    ):
        client.query(QUERY)
    err = _execute(
        _node_stub(fed, _analyst(fed)),
        serde.signed_query_to_proto(sign_query(ident, canonical_bytes(QUERY))),
    )
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (err.details() or "")


@pytest.mark.usefixtures("unchanged_budget")
def test_analyst_calling_the_auditor_stream(fed: LocalFederation) -> None:
    stub = _node_stub(fed, _analyst(fed))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamLedger(node_pb2.LedgerRequest(), timeout=10))
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "only auditors" in (info.value.details() or "")


@pytest.mark.usefixtures("unchanged_budget")
def test_auditor_submitting_a_query(fed: LocalFederation) -> None:
    auditor = _identity(fed, Role.AUDITOR, AUDITOR_NAME)
    envelope = serde.signed_query_to_proto(_signed(fed))
    err = _execute(_node_stub(fed, auditor), envelope)
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    channel = secure_channel(fed.hub_address, auditor, server_name="hub")
    with pytest.raises(grpc.RpcError) as info:
        hub_pb2_grpc.HubStub(channel).Submit(hub_pb2.SubmitRequest(envelope=envelope), timeout=10)
    assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED


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
