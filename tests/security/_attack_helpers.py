"""Shared by the attack tests: reaching the attack federation's nodes as a given party.

The federation itself (and the fixture that checks no budget moved) is in conftest.py.
"""

from __future__ import annotations

import grpc
import pytest

from coordinator.local.federation import AUDITOR_NAME, LocalFederation
from protocols.security.envelope import SignedQuery, sign_query
from protocols.security.pki import Identity, Role, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.spec import Query, canonical_bytes

NODE = "nwc"


def _identity(fed: LocalFederation, role: Role, name: str) -> Identity:
    return load_identity(fed.identity_dir(role, name))


def _analyst(fed: LocalFederation, name: str = "demo-analyst") -> Identity:
    return _identity(fed, Role.ANALYST, name)


def _node_stub(fed: LocalFederation, identity: Identity) -> node_pb2_grpc.NodeStub:
    channel = secure_channel(f"127.0.0.1:{fed.node_port(NODE)}", identity, server_name=NODE)
    return node_pb2_grpc.NodeStub(channel)


def _spent(fed: LocalFederation) -> dict[str, float]:
    auditor = _identity(fed, Role.AUDITOR, AUDITOR_NAME)
    out = {}
    for setup in fed.nodes:
        channel = secure_channel(
            f"127.0.0.1:{fed.node_port(setup.name)}", auditor, server_name=setup.name
        )
        out[setup.name] = (
            node_pb2_grpc.NodeStub(channel)
            .Describe(node_pb2.DescribeRequest(), timeout=10)
            .budget.rho_spent
        )
        channel.close()
    return out


def _execute(stub: node_pb2_grpc.NodeStub, envelope: node_pb2.QueryEnvelope) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    return info.value


QUERY = Query(view="persons", rho=0.05, group_by=("sex",))


def _signed(fed: LocalFederation, query: Query = QUERY, **kw: int) -> SignedQuery:
    return sign_query(_analyst(fed), canonical_bytes(query), **kw)
