"""Parallel calls to every node with one deadline; each node's fate is reported, never hidden."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from coordinator.hub.registry import NodeHandle
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


def _mark_done(finished: dict[str, float], name: str, _future: grpc.Future[Any]) -> None:
    finished.setdefault(name, time.perf_counter())


def fan_out(
    handles: Sequence[NodeHandle],
    start: Callable[[NodeHandle, float], grpc.Future[Any]],
    *,
    deadline_s: float,
) -> list[Reply[object]]:
    """Start one call per node at once, then collect each by the shared deadline."""
    began = time.perf_counter()
    finished: dict[str, float] = {}
    pending = []
    for h in handles:
        future = start(h, deadline_s)
        # Record each node's own finish time; collecting in order would inflate latencies.
        future.add_done_callback(functools.partial(_mark_done, finished, h.entry.name))
        pending.append((h, future))
    replies: list[Reply[object]] = []
    for handle, future in pending:
        name = handle.entry.name
        charged = 0.0
        try:
            value = future.result()
            status, message, code = NodeStatus.OK, "", grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            charged = rho_charged_of(exc)
            status, value = classify(code), None
            message = exc.details() or code.name
            if status is NodeStatus.UNREACHABLE:
                message = f"node {name} at {handle.entry.address} is unreachable: {message}"
            elif status is NodeStatus.TIMED_OUT:
                # A node refuses at no cost once it sees the deadline has passed; an answer
                # lost after its charge was recorded still shows in `chc budget` and audits.
                message = (
                    f"node {name} did not answer within {deadline_s:g} s (a node charges "
                    "nothing once it sees the deadline has passed; `chc budget` shows its spend)"
                )
        replies.append(
            Reply(
                node=name,
                status=status,
                value=value,
                message=message,
                code=code,
                latency_ms=(finished.get(name, time.perf_counter()) - began) * 1000,
                rho_charged=charged,
            )
        )
    return replies
