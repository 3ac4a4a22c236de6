"""The metrics interceptor and collectors, on real gRPC servers on loopback.

The services here are small Node servicers of the test's own (real protocol messages, real
`guarded` refusals by context.abort), so each outcome is produced on purpose: an answer, a
refusal, an unexpected error, a stream, a re-sent release.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from node.budget.accounting import Charge, MemoryAccountant
from protocols.budget.policy import BudgetPolicy
from protocols.observability import metrics as m
from protocols.observability.health import Health, check
from protocols.observability.listeners import ServingSettings, start_listeners
from protocols.rpc import guarded, make_server
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.errors import PermissionDeniedError, QueryError

NODE_SERVICE = node_pb2.DESCRIPTOR.services_by_name["Node"].full_name


class _Servicer(node_pb2_grpc.NodeServicer):
    """Execute answers, refuses or fails as its request's analyst asks; others as named."""

    @guarded
    def Execute(  # noqa: N802 - gRPC method name
        self, request: node_pb2.ExecuteRequest, _context: grpc.ServicerContext
    ) -> node_pb2.ExecuteResponse:
        what = request.envelope.analyst
        m.observe_ledger_append(0.002)  # as the node's ledger does within a call
        if what == "refuse":
            raise PermissionDeniedError("not allowed")
        if what == "invalid":
            raise QueryError("bad query")
        if what == "boom":
            raise RuntimeError("an unexpected bug")
        return node_pb2.ExecuteResponse(query_id="q-123", resent=what == "resend")

    def Describe(  # noqa: N802 - unguarded on purpose: a raw exception ends UNKNOWN
        self, _request: node_pb2.DescribeRequest, _context: grpc.ServicerContext
    ) -> node_pb2.DescribeResponse:
        raise RuntimeError("not guarded")

    @guarded
    def StreamLedger(  # noqa: N802 - gRPC method name
        self, request: node_pb2.LedgerRequest, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.LedgerEntry]:
        for seq in range(1, 4):
            yield node_pb2.LedgerEntry(sequence=seq)
        if request.from_sequence == 99:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no such entry")


@contextmanager
def _served(metrics: m.Metrics, health: Health | None = None) -> Iterator[grpc.Channel]:
    server, port = make_server("127.0.0.1:0", None, metrics=metrics, health=health)
    node_pb2_grpc.add_NodeServicer_to_server(_Servicer(), server)  # type: ignore[abstract]
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        server.stop(None).wait()


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _execute(channel: grpc.Channel, analyst: str) -> grpc.StatusCode:
    stub = node_pb2_grpc.NodeStub(channel)
    envelope = node_pb2.QueryEnvelope(analyst=analyst)
    try:
        stub.Execute(node_pb2.ExecuteRequest(envelope=envelope), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_each_call_is_counted_with_its_final_status_code() -> None:
    """Answers, refusals by abort, and unexpected errors each count as their own code."""
    metrics = m.Metrics("node")
    with _served(metrics) as channel:
        assert _execute(channel, "ok") is grpc.StatusCode.OK
        assert _execute(channel, "refuse") is grpc.StatusCode.PERMISSION_DENIED
        assert _execute(channel, "refuse") is grpc.StatusCode.PERMISSION_DENIED
        assert _execute(channel, "invalid") is grpc.StatusCode.INVALID_ARGUMENT
        assert _execute(channel, "boom") is grpc.StatusCode.INTERNAL
        assert _execute(channel, "resend") is grpc.StatusCode.OK
        with pytest.raises(grpc.RpcError) as caught:
            node_pb2_grpc.NodeStub(channel).Describe(node_pb2.DescribeRequest(), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNKNOWN
    r = metrics.registry
    calls = "chc_rpc_requests_total"
    by = {"service": NODE_SERVICE, "method": "Execute"}
    assert _value(r, calls, **by, code="OK") == 2
    assert _value(r, calls, **by, code="PERMISSION_DENIED") == 2
    assert _value(r, calls, **by, code="INVALID_ARGUMENT") == 1
    assert _value(r, calls, **by, code="INTERNAL") == 1
    assert _value(r, calls, **by, code="UNKNOWN") == 0  # a refusal is never UNKNOWN
    assert _value(r, calls, service=NODE_SERVICE, method="Describe", code="UNKNOWN") == 1
    # Every call is timed under its code; none is left in flight.
    assert _value(r, "chc_rpc_duration_seconds_count", **by, code="PERMISSION_DENIED") == 2
    assert _value(r, "chc_rpc_duration_seconds_sum", **by, code="OK") > 0
    assert _value(r, "chc_rpc_in_flight", **by) == 0
    assert metrics.in_flight_total() == 0
    queries = "chc_queries_total"
    assert _value(r, queries, method="Execute", outcome="released") == 1
    assert _value(r, queries, method="Execute", outcome="resent") == 1
    assert _value(r, queries, method="Execute", outcome="refused") == 3
    assert _value(r, queries, method="Execute", outcome="failed") == 1
    assert _value(r, queries, method="Describe", outcome="failed") == 0  # not a query method


def test_a_stream_is_counted_when_it_ends() -> None:
    """A server stream counts once, with OK or the code it was aborted with midway."""
    metrics = m.Metrics("node")
    with _served(metrics) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        entries = list(stub.StreamLedger(node_pb2.LedgerRequest(from_sequence=1), timeout=10))
        assert [e.sequence for e in entries] == [1, 2, 3]
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.StreamLedger(node_pb2.LedgerRequest(from_sequence=99), timeout=10))
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    by = {"service": NODE_SERVICE, "method": "StreamLedger"}
    r = metrics.registry
    assert _value(r, "chc_rpc_requests_total", **by, code="OK") == 1
    assert _value(r, "chc_rpc_requests_total", **by, code="FAILED_PRECONDITION") == 1
    assert metrics.in_flight_total() == 0


def test_two_servers_in_one_process_keep_their_own_metrics() -> None:
    """Per-process registries never collide, and a hook reaches the server of its call."""
    first, second = m.Metrics("node"), m.Metrics("node")
    with _served(first) as a, _served(second) as b:
        assert _execute(a, "ok") is grpc.StatusCode.OK
        assert _execute(a, "ok") is grpc.StatusCode.OK
        assert _execute(b, "ok") is grpc.StatusCode.OK
    assert _value(first.registry, "chc_ledger_append_seconds_count") == 2
    assert _value(second.registry, "chc_ledger_append_seconds_count") == 1
    by = {"service": NODE_SERVICE, "method": "Execute", "code": "OK"}
    assert _value(first.registry, "chc_rpc_requests_total", **by) == 2
    assert _value(second.registry, "chc_rpc_requests_total", **by) == 1
    # Outside any call, with no process metrics, a hook records nothing and never fails.
    m.use_for_process(None)
    m.observe_ledger_append(0.5)
    assert _value(first.registry, "chc_ledger_append_seconds_count") == 2


def test_hub_hooks_record_node_status_and_combine_latency() -> None:
    """record_node_status keeps each node's last status and counts; combine_timer times."""
    hub = m.Metrics("hub")
    m.use_for_process(hub)
    try:
        m.record_node_status("north", "ok")
        m.record_node_status("south", "timed_out")
        m.record_node_status("north", "unreachable")
        m.record_node_status("south", "nonsense")  # an unknown status counts as an error
        with m.combine_timer():
            pass
    finally:
        m.use_for_process(None)
    r = hub.registry
    status = "chc_hub_node_status"
    assert _value(r, status, node="north", chc_hub_node_status="unreachable") == 1
    assert _value(r, status, node="north", chc_hub_node_status="ok") == 0
    assert _value(r, status, node="south", chc_hub_node_status="error") == 1
    assert _value(r, "chc_hub_node_replies_total", node="north", status="ok") == 1
    assert _value(r, "chc_hub_node_replies_total", node="south", status="timed_out") == 1
    assert _value(r, "chc_hub_combine_seconds_count") == 1
    # A node's registry has no hub families, and a hub's no ledger.
    assert r.get_sample_value("chc_ledger_append_seconds_count") is None
    assert m.Metrics("node").registry.get_sample_value("chc_hub_combine_seconds_count") is None


def test_budget_collector_reads_the_ledger_at_scrape_time() -> None:
    """rho spent follows the accountant's charges; per analyst only for configured ones."""
    policy = BudgetPolicy(total_rho=2.0, max_rho_per_query=1.0, analysts=(("ada", 1.5),))
    accountant = MemoryAccountant(policy, node="north")
    metrics = m.Metrics("node")
    metrics.registry.register(
        m.BudgetCollector(
            node="north",
            status=accountant.status,
            lifetime_spent=accountant.lifetime_spent,
            analysts=("ada",),
        )
    )
    r = metrics.registry
    assert _value(r, "chc_node_rho_spent", node="north", analyst="") == 0
    assert _value(r, "chc_node_rho_total", node="north") == 2.0
    for who, rho in (("ada", 0.25), ("bob", 0.5)):
        accountant.charge(
            Charge(
                query_id=f"q-{who}",
                analyst=who,
                query=b"{}",
                envelope=b"",
                views=("persons",),
                rho=rho,
                epsilon=1.0,
            )
        )
    assert _value(r, "chc_node_rho_spent", node="north", analyst="") == pytest.approx(0.75)
    assert _value(r, "chc_node_rho_spent", node="north", analyst="ada") == pytest.approx(0.25)
    assert r.get_sample_value("chc_node_rho_spent", {"node": "north", "analyst": "bob"}) is None
    assert _value(r, "chc_node_rho_lifetime_spent", node="north") == pytest.approx(0.75)


def test_health_and_metrics_listeners_answer_without_a_certificate() -> None:
    """The plaintext health listener follows SERVING -> NOT_SERVING; /metrics is scrapeable."""
    metrics, health = m.Metrics("node"), Health([NODE_SERVICE])
    settings = ServingSettings(metrics_listen="127.0.0.1:0", health_listen="127.0.0.1:0")
    side = start_listeners(settings, registry=metrics.registry, health=health)
    try:
        assert side.health_port
        assert side.metrics_port
        with (
            _served(metrics, health) as main,
            grpc.insecure_channel(f"127.0.0.1:{side.health_port}") as probe,
        ):
            assert check(probe) == "NOT_SERVING"  # not started yet
            health.serving()
            assert check(probe) == "SERVING"
            assert check(main) == "SERVING"
            assert check(probe, NODE_SERVICE) == "SERVING"
            assert _execute(main, "refuse") is grpc.StatusCode.PERMISSION_DENIED
            health.drain()
            health.serving()  # ignored once draining
            assert check(probe) == "NOT_SERVING"
            assert check(main, NODE_SERVICE) == "NOT_SERVING"
            # Only health is served on the probe listener.
            with pytest.raises(grpc.RpcError) as caught:
                _execute_raising(probe)
            assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
        url = f"http://127.0.0.1:{side.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
    finally:
        side.stop()
    line = (
        'chc_rpc_requests_total{code="PERMISSION_DENIED",method="Execute",'
        f'service="{NODE_SERVICE}"}} 1.0'
    )
    assert line in text
    # Health checks on the main port are counted too (the probe listener's are not).
    health_line = 'chc_rpc_requests_total{code="OK",method="Check",service="grpc.health.v1.Health"}'
    assert f"{health_line} 2.0" in text
    assert text == generate_latest(metrics.registry).decode()


def _execute_raising(channel: grpc.Channel) -> None:
    stub = node_pb2_grpc.NodeStub(channel)
    stub.Execute(node_pb2.ExecuteRequest(), timeout=10)
