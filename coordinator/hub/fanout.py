"""Parallel calls to every node with one deadline; each node's fate is reported, never hidden.

Calls run as grpc.aio calls on one asyncio event loop (its own thread) shared by every
fan-out: a `.future()` call makes gRPC start a polling thread per channel per call, which cost
a third of the hub's time at 100 nodes, and a pool of blocking calls costs a thread hand-off
and its wake-ups per node.

A node that cannot be reached (UNAVAILABLE) is called again with backoff, inside the
deadline and for at most protocols.retries.RETRY_WINDOW_S, when `retry` allows it (calls
that are idempotent: node/service.py keeps each release for its envelope); a node whose last
call found it unreachable is retried for DOWN_RETRY_WINDOW_S only, so that a node that is
down does not hold every query up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from coordinator.hub.registry import NodeHandle
from protocols.link_frames import DIAL_ADDRESS, NOT_CONNECTED
from protocols.observability.metrics import record_node_status
from protocols.retries import (
    DOWN_RETRY_WINDOW_S,
    NODE_FIRST_BACKOFF_S,
    NODE_MAX_BACKOFF_S,
    RETRY_WINDOW_S,
    backoff_s,
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
    # A fetch-only re-send (kept_only) to a node that kept no release: nothing was charged.
    grpc.StatusCode.NOT_FOUND,
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
    attempts: int = 1  # calls made (more than one: the node was unreachable at first)
    # Timed out, and whether the node charged is not known (HubService._late_answers).
    charge_unknown: bool = False
    # Unreachable, but some attempt may have reached the node before its connection was
    # lost (so it may have charged): not a failure to connect at all.
    may_have_arrived: bool = False


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


class _EventLoop:
    """The one asyncio event loop (in its own thread) that runs every fan-out of this hub."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="chc-fan-out", daemon=True
        )
        self.thread.start()


_LOOP: _EventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = _EventLoop()
        return _LOOP.loop


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine in the fan-out loop and wait for it (from any other thread)."""
    return asyncio.run_coroutine_threadsafe(coroutine, _event_loop()).result()


def close_links(handles: Sequence[NodeHandle]) -> None:
    """Close the nodes' asyncio channels (the registry's close)."""
    if _LOOP is None:
        return

    async def close_all() -> None:
        await asyncio.gather(*(h.link.close() for h in handles))

    _run(close_all())


async def _call(
    handle: NodeHandle,
    method: str,
    request: Message,
    began: float,
    deadline_s: float,
    retry: bool,
    probe: bool = False,
) -> Reply[object]:
    """Call one node (again while it is unreachable, if allowed) and say how it ended.

    A probe leaves the node's reachability record alone (see fan_out).
    """
    name = handle.entry.name
    end = began + deadline_s
    # A node that just went is given time to come back; one known to be down, a moment (its
    # channel may be reconnecting now), so that it does not hold every query up.
    window = DOWN_RETRY_WINDOW_S if handle.reach.down else RETRY_WINDOW_S
    retry_until = min(end, began + window) if retry else began
    attempts = 0
    arrived = False  # whether any attempt may have reached the node
    while True:
        attempts += 1
        remaining = end - time.perf_counter()
        if remaining <= 0:  # the deadline passed while waiting to retry
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            return _failed(handle, None, code, began, deadline_s, attempts, arrived)
        try:
            value = await getattr(handle.link.stub(), method)(request, timeout=remaining)
        except grpc.RpcError as exc:
            code = _code(exc)
            arrived = arrived or code is not grpc.StatusCode.UNAVAILABLE or not _never_sent(exc)
            wait = backoff_s(attempts, first_s=NODE_FIRST_BACKOFF_S, max_s=NODE_MAX_BACKOFF_S)
            if code is grpc.StatusCode.UNAVAILABLE and time.perf_counter() + wait < retry_until:
                await asyncio.sleep(wait)
                continue
            if not probe:
                handle.reach.record(reached=code is not grpc.StatusCode.UNAVAILABLE)
            return _failed(handle, exc, code, began, deadline_s, attempts, arrived)
        if not probe:
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


# How gRPC says that no connection could be made (core's load-balancing policies and its
# resolver word it so), and how the hub says an outbound node had no link: the call was then
# never sent. Any other UNAVAILABLE (a connection reset, a server cancelling its calls as
# it goes down) may have come after the node received the call.
_NEVER_SENT = ("failed to connect to all addresses", "DNS resolution failed", NOT_CONNECTED)


def _never_sent(exc: grpc.RpcError) -> bool:
    details = getattr(exc, "details", None)
    text = (details() if callable(details) else None) or ""
    return any(marker in text for marker in _NEVER_SENT)


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    # Blocking calls raise grpc.Call errors, asyncio ones AioRpcError: both have code().
    code = getattr(exc, "code", None)
    found = code() if callable(code) else None
    return found if isinstance(found, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _failed(
    handle: NodeHandle,
    exc: grpc.RpcError | None,
    code: grpc.StatusCode,
    began: float,
    deadline_s: float,
    attempts: int,
    arrived: bool = False,
) -> Reply[object]:
    name = handle.entry.name
    status = classify(code)
    details = getattr(exc, "details", None)
    message = (details() if callable(details) else None) or code.name
    if status is NodeStatus.UNREACHABLE:
        tried = f" ({attempts} attempts)" if attempts > 1 else ""
        # An outbound-only node (address "dial") has no address: its message says why.
        where = "" if handle.entry.address == DIAL_ADDRESS else f" at {handle.entry.address}"
        message = f"node {name}{where} is unreachable{tried}: {message}"
    elif status is NodeStatus.TIMED_OUT:
        # Whether it charged is not known here: a node refuses at no cost once it sees the
        # deadline has passed, but a charge made just before it, whose reply came late, is
        # kept. The hub's Submit then asks for that kept release (HubService._late_answers).
        message = f"node {name} did not answer within {deadline_s:g} s"
    return Reply(
        node=name,
        status=status,
        value=None,
        message=message,
        code=code,
        latency_ms=(time.perf_counter() - began) * 1000,
        rho_charged=rho_charged_of(exc) if exc is not None else 0.0,
        attempts=attempts,
        may_have_arrived=arrived and status is NodeStatus.UNREACHABLE,
    )


def fan_out(
    handles: Sequence[NodeHandle],
    method: str,
    request: Message,
    *,
    deadline_s: float,
    retry: bool = True,
    probe: bool = False,
) -> list[Reply[object]]:
    """Call `method` of every node at once with one request, each by the shared deadline;
    replies in the handles' order.

    `retry` says whether a call may be repeated while its node is unreachable (only for
    idempotent calls: Execute, Explain, Describe). A `probe` (the hub's Describe before a
    query) is never repeated and leaves each node's reachability record alone, so that the
    query's own call still gives a node that just went its full retry window.
    """
    began = time.perf_counter()

    async def every_node() -> list[Reply[object]]:
        calls = (
            _call(h, method, request, began, deadline_s, retry and not probe, probe)
            for h in handles
        )
        return list(await asyncio.gather(*calls))

    replies = _run(every_node())
    if not probe:  # the metric counts the nodes' answers to calls, not the hub's probes
        for r in replies:
            record_node_status(r.node, r.status.value)
    return replies
