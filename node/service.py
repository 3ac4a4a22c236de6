"""The node's gRPC servicer: the enforcer of policy, noise and budget (DESIGN principle 1)."""

from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc
import pyarrow as pa

from node.policy import Budget
from node.store import OmopStore
from protocols import serde
from protocols.errors import AuthenticationError, PermissionDeniedError
from protocols.rpc import guarded
from protocols.security import Peer, Role, now_ms, peer_of, verify_query
from protocols.v1 import node_pb2, node_pb2_grpc
from queries import mechanisms, plan, spec
from queries.results import NodeDescription, NodeRelease, NoiseInfo
from queries.schema import Catalog

log = logging.getLogger(__name__)

# Who may ask a node to run a query: the hub relays analysts' signed envelopes, and an
# analyst may also call a node directly. Auditors read; other nodes never query.
QUERY_ROLES = frozenset({Role.HUB, Role.ANALYST})


class NonceStore:
    """Nonces seen, kept until their envelope expires, so a replay is refused."""

    def __init__(self) -> None:
        self._seen: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def claim(self, nonce: bytes, expires_at_ms: int) -> None:
        """Record a fresh nonce, or raise AuthenticationError if it was seen before."""
        now = now_ms()
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen = {n: e for n, e in self._seen.items() if e > now}
            if nonce in self._seen:
                raise AuthenticationError("this query envelope was already used; sign it again")
            self._seen[nonce] = expires_at_ms


class NodeService(node_pb2_grpc.NodeServicer):
    """Answers Describe and Execute for one region's data."""

    def __init__(
        self,
        *,
        name: str,
        store: OmopStore,
        catalog: Catalog,
        budget: Budget,
        ca_pem: bytes,
        require_tls: bool = True,
    ) -> None:
        self.name = name
        self.store = store
        self.catalog = catalog
        self.budget = budget
        self.ca_pem = ca_pem
        self.require_tls = require_tls
        self.nonces = NonceStore()

    def _peer(self, context: grpc.ServicerContext) -> Peer | None:
        if not self.require_tls:
            return None
        return peer_of(context)

    @guarded
    def Describe(  # noqa: N802 - gRPC method name
        self, request: node_pb2.DescribeRequest, context: grpc.ServicerContext
    ) -> node_pb2.DescribeResponse:
        """The public catalog and budget."""
        del request  # carries no fields
        self._peer(context)
        return serde.description_to_proto(
            NodeDescription(
                node=self.name,
                protocol_version=serde.PROTOCOL_VERSION,
                catalog=self.catalog,
                budget=self.budget.status(),
            )
        )

    @guarded
    def Execute(  # noqa: N802 - gRPC method name
        self, request: node_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> node_pb2.ExecuteResponse:
        """Verify, plan, charge, then release one query (refusals cost nothing)."""
        peer = self._peer(context)
        if peer is not None and peer.role not in QUERY_ROLES:
            raise PermissionDeniedError(
                f"{peer.name} has role {peer.role.value}; only analysts (directly or through "
                "the hub) may run queries"
            )
        signed = serde.signed_query_from_proto(request.envelope)
        analyst = verify_query(signed, self.ca_pem)
        if peer is not None and peer.role is Role.ANALYST and peer.name != analyst:
            raise AuthenticationError("an analyst may only submit envelopes it signed itself")
        query = spec.from_json(signed.query)
        compiled = plan.compile_query(query, self.catalog)
        self.budget.check(query.rho)
        # The nonce is claimed only once the query is known to be acceptable, so that a
        # refused query can be fixed and re-signed without confusion; a replay of an
        # accepted envelope is refused here, before any computation.
        self.nonces.claim(signed.nonce, signed.expires_at_ms)
        query_id = uuid.uuid4().hex
        started = time.perf_counter()
        exact = self._exact(compiled)
        calibration = mechanisms.calibrate(compiled.sensitivity, query.rho)
        # Charge before release (principle 2): from here a failure loses the result, never
        # the charge.
        budget = self.budget.charge(calibration.rho)
        noisy = mechanisms.add_noise(calibration, exact)
        table = _release_table(compiled, noisy)
        log.info(
            "query %s from %s: view=%s groups=%d rho=%.6g in %.1f ms",
            query_id,
            analyst,
            query.view,
            len(compiled.domain),
            calibration.rho,
            (time.perf_counter() - started) * 1000,
        )
        return serde.release_to_proto(
            NodeRelease(
                query_id=query_id,
                table=table,
                noise=NoiseInfo(
                    mechanism=mechanisms.MECHANISM,
                    scale=calibration.scale,
                    variance=calibration.variance,
                    sensitivity=calibration.sensitivity,
                ),
                rho_charged=calibration.rho,
                epsilon=mechanisms.rho_to_epsilon(calibration.rho, budget.delta),
                budget=budget,
            )
        )

    def _exact(self, compiled: plan.Plan) -> list[int]:
        """Exact counts re-indexed onto the public domain; never leaves this process."""
        result = self.store.query(compiled.sql)
        keys = [result.column(c).to_pylist() for c in compiled.group_by]
        index = {tuple(str(k[i]) for k in keys): i for i in range(result.num_rows)}
        values: list[int] = []
        for m in compiled.query.measures:
            column = result.column(m.name).to_pylist()
            for group in compiled.domain:
                i = index.get(group)
                values.append(int(column[i]) if i is not None else 0)
        return values


def _release_table(compiled: plan.Plan, values: tuple[int, ...]) -> pa.Table:
    """Group columns, then one int64 column per measure, one row per public group."""
    n = len(compiled.domain)
    columns: dict[str, pa.Array] = {
        c: pa.array([g[j] for g in compiled.domain], pa.string())
        for j, c in enumerate(compiled.group_by)
    }
    for k, m in enumerate(compiled.query.measures):
        columns[m.name] = pa.array(values[k * n : (k + 1) * n], pa.int64())
    return pa.table(columns)
