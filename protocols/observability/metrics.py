"""Prometheus metrics of a node or hub process, and the interceptor that counts every call.

Each server process makes one Metrics (its own CollectorRegistry, never the library's global
one), so that tests running several services in one process never collide on a metric name.
The interceptor marks the Metrics of the call it is serving as current (a context variable),
so the hooks the services call (observe_ledger_append, record_node_status, combine_timer)
reach the right registry without being handed it; outside any call they reach the process's
own (use_for_process), or nothing.

Labels are bounded by the code, never by what a caller sends: gRPC service and method names
of the services registered on the server (anything else is counted as "unknown"), status code
names, node names from hub.toml, and analyst names from the node's own [budget.analysts].
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from protocols.observability.logs import bind
from queries.results import BudgetStatus, NodeStatus

log = logging.getLogger("chc.rpc")

Role = Literal["node", "hub"]

# Seconds: a refusal takes about a millisecond, a query over millions of rows several seconds,
# a fan-out up to the hub's deadline (30 s by default).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A ledger append is one SQLite transaction with an fsync: about a millisecond on a local disk.
LEDGER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Pooling node releases at the hub: milliseconds for a few nodes, more for hundreds.
COMBINE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# The calls that answer a query with data (a release) at a node or at the hub.
QUERY_METHODS: dict[Role, frozenset[str]] = {
    "node": frozenset({"Execute", "FitStep"}),
    "hub": frozenset({"Submit", "Fit", "Train"}),
}
# Status codes by which a query is refused for what it asks or who asks (nothing released);
# anything else but OK is a failure (the node or hub could not answer).
REFUSAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
NODE_STATES = [s.value for s in NodeStatus]

_current: ContextVar[Metrics | None] = ContextVar("chc_metrics", default=None)
_process: list[Metrics] = []  # at most one: the process's own, for hooks outside any call


class Metrics:
    """One process's metrics, in a registry of its own (scraped at /metrics)."""

    def __init__(self, role: Role, registry: CollectorRegistry | None = None) -> None:
        self.role: Role = role
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chc_rpc_requests",
            "gRPC calls handled, by service, method and final status code",
            ["service", "method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "chc_rpc_duration_seconds",
            "Time from a call's arrival to its final status, by service, method and code",
            ["service", "method", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "chc_rpc_in_flight", "gRPC calls being handled now", ["service", "method"], registry=r
        )
        self.queries = Counter(
            "chc_queries",
            "Queries answered (released), answered again from the stored release (resent), "
            "refused, or failed, by method",
            ["method", "outcome"],
            registry=r,
        )
        self.ledger_append: Histogram | None = None
        self.node_status: Enum | None = None
        self.node_replies: Counter | None = None
        self.combine: Histogram | None = None
        if role == "node":
            self.ledger_append = Histogram(
                "chc_ledger_append_seconds",
                "Time to append one entry (charge or refusal) to the signed ledger",
                buckets=LEDGER_BUCKETS,
                registry=r,
            )
        else:
            self.node_status = Enum(
                "chc_hub_node_status",
                "Each node's status in the hub's last fan-out to it",
                ["node"],
                states=NODE_STATES,
                registry=r,
            )
            self.node_replies = Counter(
                "chc_hub_node_replies",
                "Node replies in the hub's fan-outs, by node and status",
                ["node", "status"],
                registry=r,
            )
            self.combine = Histogram(
                "chc_hub_combine_seconds",
                "Time to pool the nodes' releases of one query into the federated result",
                buckets=COMBINE_BUCKETS,
                registry=r,
            )
        self._busy = 0
        self._idle = threading.Condition()

    @staticmethod
    def labels_of(full_method: str) -> tuple[str, str]:
        """(service, method) of '/pkg.Service/Method'.

        Only called for methods registered on the server (gRPC itself answers UNIMPLEMENTED
        to any other), so the labels are bounded by the services served.
        """
        _, _, rest = full_method.partition("/")
        service, _, method = rest.partition("/")
        return service, method

    def in_flight_total(self) -> int:
        """Calls being handled now, health calls aside (the drain waits for none)."""
        with self._idle:
            return self._busy

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is being handled, at most timeout seconds; True if none is."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout=timeout)

    def _begin(self, service: str, method: str) -> None:
        self.in_flight.labels(service, method).inc()
        if not _is_health(service):  # a health Watch lasts as long as its watcher
            with self._idle:
                self._busy += 1

    def _end(self, service: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.in_flight.labels(service, method).dec()
        self.requests.labels(service, method, code.name).inc()
        self.latency.labels(service, method, code.name).observe(seconds)
        if not _is_health(service):
            with self._idle:
                self._busy -= 1
                if self._busy == 0:
                    self._idle.notify_all()

    def _query_outcome(self, method: str, code: grpc.StatusCode, response: object) -> None:
        if method not in QUERY_METHODS[self.role]:
            return
        if code is grpc.StatusCode.OK:
            outcome = "resent" if getattr(response, "resent", False) is True else "released"
        elif code in REFUSAL_CODES:
            outcome = "refused"
        else:
            outcome = "failed"
        self.queries.labels(method, outcome).inc()

    def interceptor(self) -> MetricsInterceptor:
        """The server interceptor that counts and times every call into these metrics."""
        return MetricsInterceptor(self)


def use_for_process(metrics: Metrics | None) -> None:
    """Make metrics the process's own: hooks called outside any call reach it."""
    _process.clear()
    if metrics is not None:
        _process.append(metrics)


def current() -> Metrics | None:
    """The metrics of the call being handled in this thread, else the process's own."""
    active = _current.get()
    if active is not None:
        return active
    return _process[0] if _process else None


def observe_ledger_append(seconds: float) -> None:
    """Record how long one ledger append took (the node's ledger calls it per entry)."""
    metrics = current()
    if metrics is not None and metrics.ledger_append is not None:
        metrics.ledger_append.observe(seconds)


def record_node_status(node: str, status: str) -> None:
    """Record a node's status in a fan-out (the hub calls it once per node per fan-out).

    status is a queries.results.NodeStatus value ("ok", "refused", "unreachable",
    "timed_out", "error"); node a name from hub.toml, so both label sets stay bounded.
    """
    metrics = current()
    if metrics is None or metrics.node_status is None or metrics.node_replies is None:
        return
    state = str(status)
    if state not in NODE_STATES:
        state = NodeStatus.ERROR.value
    metrics.node_status.labels(node).state(state)
    metrics.node_replies.labels(node, state).inc()


def observe_combine(seconds: float) -> None:
    """Record how long pooling one query's node releases took at the hub."""
    metrics = current()
    if metrics is not None and metrics.combine is not None:
        metrics.combine.observe(seconds)


@contextmanager
def combine_timer() -> Iterator[None]:
    """Time a block that pools node releases (`with combine_timer(): combine(...)`)."""
    began = time.perf_counter()
    try:
        yield
    finally:
        observe_combine(time.perf_counter() - began)


@contextmanager
def ledger_append_timer() -> Iterator[None]:
    """Time one ledger append (`with ledger_append_timer(): ...append...`)."""
    began = time.perf_counter()
    try:
        yield
    finally:
        observe_ledger_append(time.perf_counter() - began)


@dataclass(frozen=True)
class BudgetCollector(Collector):
    """The node's rho spent and cap, read from its accountant at every scrape.

    Per node always; per analyst only for the analysts the node's own [budget.analysts]
    names (so the label set is bounded by node.toml, never by who calls).
    """

    node: str
    status: Callable[[str | None], BudgetStatus]
    lifetime_spent: Callable[[str | None], float]
    analysts: Sequence[str] = ()

    def collect(self) -> Iterator[Metric]:
        """One reading of the ledger's totals (a scrape that fails raises, as it should)."""
        spent = GaugeMetricFamily(
            "chc_node_rho_spent",
            "zCDP rho released in the current budget period (node total, or one analyst's)",
            labels=["node", "analyst"],
        )
        total = GaugeMetricFamily(
            "chc_node_rho_total",
            "The node's rho cap for the current budget period",
            labels=["node"],
        )
        lifetime = GaugeMetricFamily(
            "chc_node_rho_lifetime_spent",
            "zCDP rho released since the ledger began, in every period",
            labels=["node"],
        )
        status = self.status(None)
        spent.add_metric([self.node, ""], status.rho_spent)
        total.add_metric([self.node], status.rho_total)
        lifetime.add_metric([self.node], self.lifetime_spent(None))
        for analyst in self.analysts:
            spent.add_metric([self.node, analyst], self.status(analyst).rho_spent)
        yield spent
        yield total
        yield lifetime

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not read the ledger (it is read at scrape time)."""
        return ()


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Counts, times and logs every call, with the final status code it ends on.

    `guarded` ends refusals with context.abort, which raises; the interceptor reads the code
    abort set from the context (context.code()), so a refusal counts as its own status and
    never as UNKNOWN. Each call also binds method and peer (and the envelope's analyst) to
    the log records written while it runs.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap the handler of one call (None, an unknown method, is left to gRPC)."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = self.metrics.labels_of(handler_call_details.method)
        call = _Call(self.metrics, service, method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                call.unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                call.streaming(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                call.unary(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                call.streaming(handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


@dataclass(frozen=True)
class _Call:
    metrics: Metrics
    service: str
    method: str

    def unary(self, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            began = self._enter()
            token = _current.set(self.metrics)
            code, response = grpc.StatusCode.UNKNOWN, None
            try:
                with bind(**_fields(self.method, request, context)):
                    response = behavior(request, context)
                    code = _final(context, grpc.StatusCode.OK)
                    return response
            except BaseException:
                code = _final(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                _current.reset(token)
                self._exit(began, code, request, context, response)

        return wrapped

    def streaming(
        self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
    ) -> Callable[..., Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            began = self._enter()
            code = grpc.StatusCode.UNKNOWN
            try:
                with bind(**_fields(self.method, request, context)):
                    token = _current.set(self.metrics)
                    try:
                        yield from behavior(request, context)
                    finally:
                        _current.reset(token)
                code = _final(context, grpc.StatusCode.OK)
            except GeneratorExit:
                code = grpc.StatusCode.CANCELLED  # the caller went away mid-stream
                raise
            except BaseException:
                code = _final(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                self._exit(began, code, request, context, None)

        return wrapped

    def _enter(self) -> float:
        self.metrics._begin(self.service, self.method)
        return time.perf_counter()

    def _exit(
        self,
        began: float,
        code: grpc.StatusCode,
        request: object,
        context: grpc.ServicerContext,
        response: object,
    ) -> None:
        seconds = time.perf_counter() - began
        self.metrics._end(self.service, self.method, code, seconds)
        self.metrics._query_outcome(self.method, code, response)
        extra: dict[str, object] = {
            **_fields(self.method, request, context),
            "code": code.name,
            "duration_ms": round(seconds * 1000, 3),
        }
        query_id = getattr(response, "query_id", "")
        if isinstance(query_id, str) and query_id:
            extra["query_id"] = query_id
        # A probe checks health every few seconds: its calls are noise at INFO.
        level = logging.DEBUG if _is_health(self.service) else logging.INFO
        log.log(level, "%s %s in %.1f ms", self.method, code.name, seconds * 1000, extra=extra)


def _is_health(service: str) -> bool:
    return service.startswith("grpc.health.")


def _final(context: grpc.ServicerContext, otherwise: grpc.StatusCode) -> grpc.StatusCode:
    """The code the handler ended the call with (abort and set_code both set it)."""
    code = context.code()  # type: ignore[attr-defined]  # grpc-stubs lag grpcio 1.85
    return code if isinstance(code, grpc.StatusCode) else otherwise


def _fields(method: str, request: object, context: grpc.ServicerContext) -> dict[str, str]:
    """What a log record of this call carries: method, peer, and the analyst an envelope names.

    The analyst is the name the envelope claims (the node verifies it before acting on it).
    """
    fields = {"method": method, "peer": context.peer()}
    envelope = getattr(request, "envelope", None)
    analyst = getattr(envelope, "analyst", "")
    if isinstance(analyst, str) and analyst:
        fields["analyst"] = analyst[:128]
    return fields
