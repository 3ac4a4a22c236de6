"""Parallel calls to every node with one deadline; each node's fate is reported, never hidden.

Calls run on one shared pool of threads as blocking gRPC calls: a `.future()` call makes gRPC
start a polling thread per channel per call, which cost a third of the hub's time at 100
nodes. A node that cannot be reached (UNAVAILABLE) is called again with backoff, inside the
deadline and for at most protocols.retries.RETRY_WINDOW_S, when `retry` allows it (calls that
are idempotent: node/service.py keeps each release for its envelope); a node whose last call
found it unreachable is retried for DOWN_RETRY_WINDOW_S only, so that a node that is down does
not hold every query up.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from coordinator.hub.registry import NodeHandle
from protocols.observability.metrics import record_node_status
from protocols.retries import (
    DOWN_RETRY_WINDOW_S,
    NODE_FIRST_BACKOFF_S,
    NODE_MAX_BACKOFF_S,
    RETRY_WINDOW_S,
)
from protocols.rpc import rho_charged_of
from queries.results import NodeStatus

T = TypeVar("T")

_REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
# Threads shared by every fan-out of this hub: enough for every node of a large federation
# to be called at once (threads blocked on the network cost memory, not CPU).
MAX_PARALLEL_CALLS = 256
_POOL = ThreadPoolExecutor(max_workers=MAX_PARALLEL_CALLS, thread_name_prefix="chc-fan-out")


@dataclass(frozen=True)
class Reply(Generic[T]):
    """One node's reply (or why there is none)."""

    node: str
    status: NodeStatus
    value: T | None
    message: str
    code: grpc.StatusCode | None
    latency_ms: float
    # What a refusing node says it charged before refusing (a fit's design check).
    rho_charged: float = 0.0
    attempts: int = 1  # calls made (more than one: the node was unreachable at first)


def unanimous_refusal(replies: Sequence[Reply[Any]]) -> tuple[grpc.StatusCode, str] | None:
    """If every node refused for the same kind of reason: that status and their messages."""
    codes = {r.code for r in replies}
    if len(codes) == 1 and all(r.status is NodeStatus.REFUSED for r in replies):
        code = next(iter(codes)) or grpc.StatusCode.UNKNOWN
        return code, "; ".join(sorted({r.message for r in replies}))
    return None


def classify(code: grpc.StatusCode) -> NodeStatus:
    """Map a gRPC status to what the analyst is told about that node."""
    if code in _REFUSALS:
        return NodeStatus.REFUSED
    if code is grpc.StatusCode.UNAVAILABLE:
        return NodeStatus.UNREACHABLE
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return NodeStatus.TIMED_OUT
    return NodeStatus.ERROR


def backoff_s(attempt: int) -> float:
    """The wait before retry number `attempt` (1, 2, ...): doubling, capped, jittered."""
    full = min(NODE_MAX_BACKOFF_S, NODE_FIRST_BACKOFF_S * 2.0 ** (attempt - 1))
    return full * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not secrecy


def _call(
    handle: NodeHandle,
    call: Callable[[NodeHandle, float], Any],
    began: float,
    deadline_s: float,
    retry: bool,
) -> Reply[object]:
    """Call one node (again while it is unreachable, if allowed) and say how it ended."""
    name = handle.entry.name
    end = began + deadline_s
    # A node that just went is given time to come back; one known to be down, a moment (its
    # channel may be reconnecting now), so that it does not hold every query up.
    window = DOWN_RETRY_WINDOW_S if handle.reach.down else RETRY_WINDOW_S
    retry_until = min(end, began + window) if retry else began
    attempts = 0
    while True:
        attempts += 1
        remaining = end - time.perf_counter()
        if remaining <= 0:  # the deadline passed while waiting to retry
            return _failed(
                handle, None, grpc.StatusCode.DEADLINE_EXCEEDED, began, deadline_s, attempts
            )
        try:
            value = call(handle, remaining)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            wait = backoff_s(attempts)
            if code is grpc.StatusCode.UNAVAILABLE and time.perf_counter() + wait < retry_until:
                time.sleep(wait)
                continue
            handle.reach.record(reached=code is not grpc.StatusCode.UNAVAILABLE)
            return _failed(handle, exc, code, began, deadline_s, attempts)
        handle.reach.record(reached=True)
        return Reply(
            node=name,
            status=NodeStatus.OK,
            value=value,
            message="",
            code=grpc.StatusCode.OK,
            latency_ms=(time.perf_counter() - began) * 1000,
            attempts=attempts,
        )


def _failed(
    handle: NodeHandle,
    exc: grpc.RpcError | None,
    code: grpc.StatusCode,
    began: float,
    deadline_s: float,
    attempts: int,
) -> Reply[object]:
    name = handle.entry.name
    status = classify(code)
    details = exc.details() if isinstance(exc, grpc.Call) else None
    message = details or code.name
    if status is NodeStatus.UNREACHABLE:
        tried = f" ({attempts} attempts)" if attempts > 1 else ""
        message = f"node {name} at {handle.entry.address} is unreachable{tried}: {message}"
    elif status is NodeStatus.TIMED_OUT:
        # A node refuses at no cost once it sees the deadline has passed; an answer
        # lost after its charge was recorded still shows in `chc budget` and audits.
        message = (
            f"node {name} did not answer within {deadline_s:g} s (a node charges "
            "nothing once it sees the deadline has passed; `chc budget` shows its spend)"
        )
    return Reply(
        node=name,
        status=status,
        value=None,
        message=message,
        code=code,
        latency_ms=(time.perf_counter() - began) * 1000,
        rho_charged=rho_charged_of(exc) if exc is not None else 0.0,
        attempts=attempts,
    )


def fan_out(
    handles: Sequence[NodeHandle],
    call: Callable[[NodeHandle, float], Any],
    *,
    deadline_s: float,
    retry: bool = True,
) -> list[Reply[object]]:
    """Call every node at once, each by the shared deadline; replies in the handles' order.

    `call(handle, timeout_s)` makes one blocking gRPC call; `retry` says whether it may be
    repeated while the node is unreachable (only for idempotent calls).
    """
    began = time.perf_counter()
    pending: list[Future[Reply[object]]] = [
        _POOL.submit(_call, h, call, began, deadline_s, retry) for h in handles
    ]
    replies = [f.result() for f in pending]
    for r in replies:
        record_node_status(r.node, r.status.value)
    return replies
