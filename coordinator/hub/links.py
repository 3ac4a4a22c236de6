"""The hub's end of outbound-only nodes' links (protocols/v1/link.proto, docs/outbound.md).

An outbound-only node (address = "dial" in hub.toml) dials the hub and keeps one stream
open (NodeLink.Connect); the hub sends it calls as frames and reads the answers. One session
per connected node, the latest winning when a node reconnects; calls waiting for an answer
are futures keyed by call id. LinkChannel and AioLinkChannel are gRPC channels over a
session, so a node_pb2_grpc.NodeStub made on them has the usual methods and raises the usual
grpc.RpcError (grpc.aio.AioRpcError) with the node's own status code: the hub's service and
fan-out cannot tell a linked node from an inbound one. A node that is not connected fails
at once, UNAVAILABLE, so it is reported unreachable within the deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import grpc
from cryptography import x509

from coordinator.hub.registry import AsyncLink, NodeEntry, NodeHandle
from protocols import serde
from protocols.link_frames import (
    DIAL_ADDRESS,
    HEARTBEAT_S,
    LEDGER_KEY,
    MAX_LINK_STREAMS,
    MIN_CHALLENGE_BYTES,
    NOT_CONNECTED,
    SILENT_AFTER_S,
    STREAM_REFILL,
    STREAM_WINDOW,
    sign,
    status_code,
    welcome_payload,
)
from protocols.security.envelope import now_ms
from protocols.security.pki import Identity, Role
from protocols.security.tls import peer_of
from protocols.v1 import link_pb2, link_pb2_grpc, node_pb2, node_pb2_grpc
from protocols.version import (
    FLOW_CONTROL,
    ProtocolMismatchError,
    ProtocolVersion,
    check_compatible,
)
from queries.errors import ChcError

log = logging.getLogger("chc.hub.links")


def link_error(
    code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    """The error a linked call raises: a grpc.RpcError with code(), details() and
    trailing_metadata(), as a real call's (blocking and asyncio callers alike)."""
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details, None
    )


class _Pending:
    """One call waiting for the node: its final frame (unary) or every frame (streams).

    A stream under flow control (credit > 0) holds at most the credit granted and not yet
    read: the node sends only as credit is granted (node/dial.py), and a node that sends
    more has its call failed rather than buffered.
    """

    def __init__(self, call_id: int, streaming: bool, credit: int = 0) -> None:
        self.call_id = call_id
        self.streaming = streaming
        self.done: concurrent.futures.Future[link_pb2.NodeFrame] = concurrent.futures.Future()
        self.frames: queue.Queue[link_pb2.NodeFrame] = queue.Queue()
        self.flow_controlled = credit > 0
        self._credit = credit  # messages the node may still send
        self._lock = threading.Lock()

    def deliver(self, frame: link_pb2.NodeFrame) -> bool:
        """Take one frame from the node; False if it exceeds the credit granted (the frame is
        dropped and the call failed)."""
        if self.streaming and self.flow_controlled and not frame.end:
            with self._lock:
                self._credit -= 1
                over = self._credit < 0
            if over:
                self.fail(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "the node sent more of the stream than the hub granted credit for",
                )
                return False
        if self.streaming:
            self.frames.put(frame)
        if frame.end and not self.done.done():
            self.done.set_result(frame)
        return True

    def grant(self, credit: int) -> None:
        """The caller read some of the stream: the node may send `credit` more messages."""
        with self._lock:
            self._credit += credit

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        self.deliver(
            link_pb2.NodeFrame(
                call_id=self.call_id,
                status=link_pb2.CallStatus(code=code.value[0], details=details),
                end=True,
            )
        )


class LinkSession:
    """One open link to a node: frames to send, calls waiting for their answers."""

    def __init__(self, node: str, peer: str, *, flow_control: bool = True) -> None:
        self.node = node
        self.peer = peer
        # Whether the node honours HubFrame.credit (protocol 1.3 on); a node of an earlier
        # minor streams without it, as before.
        self.flow_control = flow_control
        self.outgoing: queue.Queue[link_pb2.HubFrame | None] = queue.Queue()
        self.last_seen = time.monotonic()
        self.closed = threading.Event()
        self.reason = ""
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()

    def call(
        self,
        method: str,
        request: bytes,
        *,
        timeout_s: float | None,
        streaming: bool = False,
        on_behalf_of: bytes = b"",
    ) -> _Pending:
        """Send one call; its answer arrives in the returned _Pending."""
        credit = STREAM_WINDOW if streaming and self.flow_control else 0
        pending = _Pending(next(self._ids), streaming, credit)
        self.close_if_silent()
        with self._lock:
            if self.closed.is_set():
                pending.fail(
                    grpc.StatusCode.UNAVAILABLE,
                    f"node {self.node} {NOT_CONNECTED}: its link closed ({self.reason})",
                )
                return pending
            self._pending[pending.call_id] = pending
        deadline_ms = 0 if timeout_s is None else max(1, int(timeout_s * 1000))
        self.outgoing.put(
            link_pb2.HubFrame(
                call_id=pending.call_id,
                method=method,
                request=request,
                deadline_ms=deadline_ms,
                on_behalf_of=on_behalf_of,
                credit=credit,
            )
        )
        return pending

    def grant(self, pending: _Pending, credit: int) -> None:
        """Let the node send `credit` more messages of a flow-controlled stream."""
        if not pending.flow_controlled or self.closed.is_set():
            return
        pending.grant(credit)
        self.outgoing.put(link_pb2.HubFrame(call_id=pending.call_id, credit=credit))

    def cancel(self, pending: _Pending) -> None:
        """The caller gave up: tell the node (a query not yet charged is then refused)."""
        with self._lock:
            found = self._pending.pop(pending.call_id, None)
        if found is not None and not self.closed.is_set():
            self.outgoing.put(link_pb2.HubFrame(call_id=pending.call_id, cancel=True))

    def receive(self, frame: link_pb2.NodeFrame) -> None:
        """A frame from the node: a heartbeat, or (part of) a call's answer."""
        self.last_seen = time.monotonic()
        if frame.call_id == 0:
            return
        with self._lock:
            pending = self._pending.get(frame.call_id)
            if pending is not None and frame.end:
                del self._pending[frame.call_id]
        if pending is not None and not pending.deliver(frame):
            self.cancel(pending)  # it sent beyond its credit: stop it there

    def close_if_silent(self) -> bool:
        """Close the link if the node has sent nothing for SILENT_AFTER_S; True if closed.

        Checked on every call and lookup and by Links' watchdog, not only by the send loop
        between frames, so a stopped node is unreachable at once rather than a call queued
        on its stale session waiting for its deadline (timed_out).
        """
        if not self.closed.is_set() and time.monotonic() - self.last_seen > SILENT_AFTER_S:
            self.close(f"the node sent nothing for {SILENT_AFTER_S:g} s")
        return self.closed.is_set()

    def close(self, reason: str) -> None:
        """End the link: every call still waiting fails UNAVAILABLE (the node is unreachable
        until it links again)."""
        with self._lock:
            if self.closed.is_set():
                return
            self.reason = reason
            self.closed.set()
            pending, self._pending = list(self._pending.values()), {}
        self.outgoing.put(None)
        for p in pending:
            p.fail(grpc.StatusCode.UNAVAILABLE, f"the link to node {self.node} closed: {reason}")


class Links:
    """Every outbound-only node's current session."""

    def __init__(self, dialing: frozenset[str]) -> None:
        self.dialing = dialing
        self._sessions: dict[str, LinkSession] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._watchdog: threading.Thread | None = None

    def open(self, node: str, peer: str, *, flow_control: bool = True) -> LinkSession:
        """A new session for node; an older one is closed (the latest link wins)."""
        session = LinkSession(node, peer, flow_control=flow_control)
        with self._lock:
            old = self._sessions.get(node)
            self._sessions[node] = session
            self._changed.notify_all()
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="chc-link-watchdog", daemon=True
                )
                self._watchdog.start()
        if old is not None:
            old.close("the node linked again")
        return session

    def _watch(self) -> None:
        """Close silent sessions, so calls waiting on them fail UNAVAILABLE promptly."""
        while True:
            time.sleep(HEARTBEAT_S / 4)
            with self._lock:
                sessions = list(self._sessions.values())
            for session in sessions:
                session.close_if_silent()

    def close_all(self, reason: str) -> None:
        """Close every session (the hub is shutting down); nodes dial again later."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.close(reason)

    def forget(self, session: LinkSession) -> None:
        """Drop a session that ended (unless a newer one replaced it already)."""
        with self._lock:
            if self._sessions.get(session.node) is session:
                del self._sessions[session.node]

    def session(self, node: str) -> LinkSession | None:
        """The node's open session, or None if it is not connected now."""
        with self._lock:
            found = self._sessions.get(node)
        return found if found is not None and not found.close_if_silent() else None

    def wait_linked(self, node: str, timeout_s: float) -> bool:
        """Wait until node has an open session (tests, and the hub's start-up log)."""
        end = time.monotonic() + timeout_s
        with self._changed:
            while self._sessions.get(node) is None or self._sessions[node].closed.is_set():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def require(self, node: str) -> LinkSession:
        """The node's session, or the error every call to an unconnected node fails with."""
        found = self.session(node)
        if found is None:
            raise link_error(
                grpc.StatusCode.UNAVAILABLE,
                f"node {node} {NOT_CONNECTED}: it has not dialled this "
                "hub since the hub started, or its link was lost",
            )
        return found

    def handle(self, entry: NodeEntry) -> NodeHandle:
        """The registry's handle for an outbound-only node: stubs over its link."""
        channel = self.channel(entry.name)
        return NodeHandle(
            entry=entry,
            channel=channel,
            stub=node_pb2_grpc.NodeStub(channel),
            link=AsyncLink(functools.partial(self.aio_channel, entry.name)),
        )

    def channel(self, node: str) -> LinkChannel:
        """A blocking channel to node over its link (for node_pb2_grpc.NodeStub)."""
        return LinkChannel(self, node)

    def aio_channel(self, node: str) -> AioLinkChannel:
        """An asyncio channel to node over its link (for the fan-out's NodeStub)."""
        return AioLinkChannel(self, node)


def _method_name(full: str) -> str:
    return full.rsplit("/", 1)[-1]


def _raise_status(frame: link_pb2.NodeFrame) -> None:
    code = status_code(frame.status)
    if code is not grpc.StatusCode.OK:
        raise link_error(code, frame.status.details, tuple(frame.status.trailers.items()))


def _trailers(frame: link_pb2.NodeFrame) -> tuple[tuple[str, str], ...]:
    return tuple(frame.status.trailers.items())


class _UnaryUnary:
    def __init__(
        self,
        links: Links,
        node: str,
        method: str,
        serialize: Callable[..., bytes],
        deserialize: Callable[[bytes], Any],
    ) -> None:
        self._links, self._node, self._method = links, node, method
        self._serialize, self._deserialize = serialize, deserialize

    def __call__(self, request: Any, timeout: float | None = None, **_: Any) -> Any:
        session = self._links.require(self._node)
        pending = session.call(self._method, self._serialize(request), timeout_s=timeout)
        try:
            frame = pending.done.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            session.cancel(pending)
            raise link_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        _raise_status(frame)
        return self._deserialize(frame.response)


class _UnaryStream:
    def __init__(
        self,
        links: Links,
        node: str,
        method: str,
        serialize: Callable[..., bytes],
        deserialize: Callable[[bytes], Any],
    ) -> None:
        self._links, self._node, self._method = links, node, method
        self._serialize, self._deserialize = serialize, deserialize

    def __call__(self, request: Any, timeout: float | None = None, **_: Any) -> Iterator[Any]:
        session = self._links.require(self._node)
        return stream_frames(
            session, self._method, self._serialize(request), timeout, self._deserialize
        )


def stream_frames(
    session: LinkSession,
    method: str,
    request: bytes,
    timeout: float | None,
    deserialize: Callable[[bytes], Any],
    *,
    on_behalf_of: bytes = b"",
) -> Generator[Any, None, None]:
    """The messages of a server-streaming call over the link, then its status (raised if
    not OK). Closing it early cancels the call at the node."""
    pending = session.call(
        method, request, timeout_s=timeout, streaming=True, on_behalf_of=on_behalf_of
    )
    end = None if timeout is None else time.monotonic() + timeout
    finished = False
    read = 0  # messages read since credit was last granted
    try:
        while True:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise link_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            try:
                frame = pending.frames.get(timeout=left)
            except queue.Empty:
                continue
            if frame.end:
                finished = True
                _raise_status(frame)
                return
            # Granted as this caller reads, not as frames arrive: a slow reader slows the
            # node instead of filling the hub's memory.
            read += 1
            if read == STREAM_REFILL:
                session.grant(pending, read)
                read = 0
            yield deserialize(frame.response)
    finally:
        if not finished:
            session.cancel(pending)


class LinkChannel(grpc.Channel):
    """A blocking gRPC channel whose calls go over a node's link."""

    def __init__(self, links: Links, node: str) -> None:
        self._links, self._node = links, node

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        """Unary calls (Describe, Explain, Execute, FitStep)."""
        return _UnaryUnary(
            self._links, self._node, _method_name(method), request_serializer, response_deserializer
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        """Server-streaming calls (StreamLedger)."""
        return _UnaryStream(
            self._links, self._node, _method_name(method), request_serializer, response_deserializer
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        """The Node service has no client-streaming call."""
        raise NotImplementedError(f"{method}: client streaming is not carried over a link")

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        """The Node service has no bidirectional call."""
        raise NotImplementedError(f"{method}: bidirectional calls are not carried over a link")

    def subscribe(self, callback: Any, try_to_connect: bool = False) -> None:
        """Connectivity is the link's: nothing to watch here."""
        del callback, try_to_connect

    def unsubscribe(self, callback: Any) -> None:
        """See subscribe."""
        del callback

    def close(self) -> None:
        """The link belongs to the node's session, not to this channel."""


class _AioUnaryUnary:
    def __init__(self, inner: _UnaryUnary) -> None:
        self._inner = inner

    def __call__(self, request: Any, timeout: float | None = None, **_: Any) -> Any:
        return self._call(request, timeout)

    async def _call(self, request: Any, timeout: float | None) -> Any:
        inner = self._inner
        session = inner._links.require(inner._node)
        pending = session.call(inner._method, inner._serialize(request), timeout_s=timeout)
        try:
            frame = await asyncio.wait_for(asyncio.wrap_future(pending.done), timeout)
        except TimeoutError:
            session.cancel(pending)
            raise link_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except asyncio.CancelledError:
            session.cancel(pending)
            raise
        _raise_status(frame)
        return inner._deserialize(frame.response)


class AioLinkChannel(grpc.aio.Channel):
    """An asyncio gRPC channel whose unary calls go over a node's link (the fan-out's)."""

    def __init__(self, links: Links, node: str) -> None:
        self._links, self._node = links, node

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        """Unary calls, awaited (Describe, Explain, Execute, FitStep)."""
        inner = _UnaryUnary(
            self._links, self._node, _method_name(method), request_serializer, response_deserializer
        )
        return _AioUnaryUnary(inner)

    def unary_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        """Not used by the fan-out; ledgers are relayed by LedgerRelayService."""
        del request_serializer, response_deserializer
        return _Unsupported(method)

    def stream_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        """The Node service has no client-streaming call."""
        del request_serializer, response_deserializer
        return _Unsupported(method)

    def stream_stream(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        **_: Any,
    ) -> Any:
        """The Node service has no bidirectional call."""
        del request_serializer, response_deserializer
        return _Unsupported(method)

    async def __aenter__(self) -> AioLinkChannel:
        return self

    async def __aexit__(self, *args: object) -> None:
        return None

    async def close(self, grace: float | None = None) -> None:
        """The link belongs to the node's session, not to this channel."""
        del grace

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY while the node is linked, else TRANSIENT_FAILURE."""
        del try_to_connect
        if self._links.session(self._node) is not None:
            return grpc.ChannelConnectivity.READY
        return grpc.ChannelConnectivity.TRANSIENT_FAILURE

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Not tracked: a link's state is its session's."""
        del last_observed_state
        await asyncio.sleep(HEARTBEAT_S)

    async def channel_ready(self) -> None:
        """Wait until the node is linked."""
        while self._links.session(self._node) is None:
            await asyncio.sleep(HEARTBEAT_S / 4)


class _Unsupported:
    def __init__(self, method: str) -> None:
        self._method = method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{self._method} is not carried over an asyncio link channel")


class NodeLinkService(link_pb2_grpc.NodeLinkServicer):
    """NodeLink.Connect: an outbound-only node's link, once its certificate and Hello check."""

    def __init__(
        self,
        links: Links,
        identity: Identity,
        *,
        is_revoked: Callable[[x509.Certificate], bool] | None = None,
    ) -> None:
        self.links = links
        self.identity = identity
        self._is_revoked = is_revoked

    def Connect(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[link_pb2.NodeFrame], context: grpc.ServicerContext
    ) -> Iterator[link_pb2.HubFrame]:
        """Check the node, welcome it with a proof of this hub, then carry its calls."""
        try:
            peer = peer_of(context, is_revoked=self._is_revoked)
        except ChcError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if peer.role is not Role.NODE:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{peer.name} has role {peer.role.value}; only nodes may link to the hub",
            )
        if peer.name not in self.links.dialing:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {peer.name} is not an outbound-only node of this hub: its hub.toml "
                f'needs [[nodes]] name = "{peer.name}" with address = "{DIAL_ADDRESS}"',
            )
        first = _first_frame(request_iterator)
        if first is None or not first.HasField("hello"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a link starts with a LinkHello")
        hello = first.hello
        if hello.node != peer.name:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the link's hello names node {hello.node[:64]!r} but its certificate is "
                f"issued to {peer.name!r}; a node links under its own name only",
            )
        try:
            # Another minor version links (protocols/version.py); another major does not.
            theirs = ProtocolVersion.parse(hello.protocol_version)
            check_compatible(theirs, them=f"node {peer.name}", us="the hub")
        except ProtocolMismatchError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if len(hello.challenge) < MIN_CHALLENGE_BYTES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the hello's challenge is too short")
        session = self.links.open(
            peer.name, context.peer(), flow_control=theirs.supports(FLOW_CONTROL)
        )
        log.info("node %s linked from %s (outbound-only)", peer.name, context.peer())
        yield link_pb2.HubFrame(
            welcome=link_pb2.LinkWelcome(
                hub_certificate=self.identity.cert_pem,
                signature=sign(
                    self.identity,
                    welcome_payload(self.identity.name, peer.name, hello.challenge),
                ),
                protocol_version=serde.PROTOCOL_VERSION,
            )
        )
        context.add_callback(lambda: session.close("the node's stream ended"))
        reader = threading.Thread(
            target=_read,
            args=(request_iterator, session),
            name=f"chc-link-{peer.name}",
            daemon=True,
        )
        reader.start()
        try:
            yield from _send(session)
        finally:
            session.close("the link ended")
            self.links.forget(session)
            log.warning("node %s's link closed", peer.name)


def _first_frame(frames: Iterator[link_pb2.NodeFrame]) -> link_pb2.NodeFrame | None:
    """The node's first frame, or None if it sends none within SILENT_AFTER_S (so that a
    connection that never says hello does not hold a worker thread)."""
    box: queue.Queue[link_pb2.NodeFrame | None] = queue.Queue(1)

    def read_one() -> None:
        try:
            box.put(next(frames, None))
        except Exception:  # the stream broke before its first frame
            box.put(None)

    threading.Thread(target=read_one, name="chc-link-hello", daemon=True).start()
    try:
        return box.get(timeout=SILENT_AFTER_S)
    except queue.Empty:
        return None


def _read(frames: Iterator[link_pb2.NodeFrame], session: LinkSession) -> None:
    try:
        for frame in frames:
            session.receive(frame)
        session.close("the node closed the link")
    except grpc.RpcError:
        session.close("the node's stream broke")
    except Exception:  # a broken stream surfaces as various errors in the request iterator
        log.exception("reading node %s's link", session.node)
        session.close("the node's stream broke")


def _send(session: LinkSession) -> Iterator[link_pb2.HubFrame]:
    """Frames for the node: its calls as they come, a heartbeat when there are none, until
    the session closes or the node has been silent too long."""
    while True:
        if session.close_if_silent():
            return
        try:
            frame = session.outgoing.get(timeout=HEARTBEAT_S)
        except queue.Empty:
            frame = link_pb2.HubFrame(heartbeat=link_pb2.Heartbeat(sent_at_ms=now_ms()))
        if frame is None:
            return
        yield frame


class LedgerRelayService(link_pb2_grpc.LedgerRelayServicer):
    """Ledgers of outbound-only nodes, relayed unchanged to auditors (who verify them)."""

    def __init__(
        self,
        links: Links,
        *,
        is_revoked: Callable[[x509.Certificate], bool] | None = None,
    ) -> None:
        self.links = links
        self._is_revoked = is_revoked
        self._streams: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def _stream_slot(self, node: str) -> threading.BoundedSemaphore:
        with self._lock:
            return self._streams.setdefault(node, threading.BoundedSemaphore(MAX_LINK_STREAMS))

    def _auditor(self, node: str, context: grpc.ServicerContext) -> tuple[LinkSession, bytes]:
        try:
            peer = peer_of(context, is_revoked=self._is_revoked)
        except ChcError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if peer.role is not Role.AUDITOR:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{peer.name} has role {peer.role.value}; only auditors read ledgers",
            )
        if node not in self.links.dialing:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {node[:64]!r} is not an outbound-only node of this hub: read its "
                "ledger from the node itself (`chc audit verify --hub` does)",
            )
        session = self.links.session(node)
        if session is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"node {node} {NOT_CONNECTED}")
        raw: object = context.auth_context().get("x509_pem_cert")
        pem = raw[0] if isinstance(raw, list | tuple) and raw else raw
        return session, pem if isinstance(pem, bytes) else b""

    def NodeLedgerKey(  # noqa: N802 - gRPC method name
        self, request: link_pb2.NodeLedgerRequest, context: grpc.ServicerContext
    ) -> link_pb2.LedgerKeyStatement:
        """The node's ledger key, signed by the node for the auditor's challenge."""
        session, pem = self._auditor(request.node, context)
        pending = session.call(
            LEDGER_KEY,
            request.SerializeToString(),
            timeout_s=context.time_remaining() or 30.0,
            on_behalf_of=pem,
        )
        try:
            frame = pending.done.result(timeout=context.time_remaining() or 30.0)
        except concurrent.futures.TimeoutError:
            session.cancel(pending)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"node {request.node} did not answer")
        code = status_code(frame.status)
        if code is not grpc.StatusCode.OK:
            context.abort(code, frame.status.details)
        return link_pb2.LedgerKeyStatement.FromString(frame.response)

    def StreamNodeLedger(  # noqa: N802 - gRPC method name
        self, request: link_pb2.NodeLedgerRequest, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.LedgerEntry]:
        """The node's StreamLedger frames, unchanged, as the auditor's own call would get."""
        session, pem = self._auditor(request.node, context)
        slot = self._stream_slot(request.node)
        if not slot.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"node {request.node} is already streaming its ledger to {MAX_LINK_STREAMS} "
                "readers through this hub; try again when one of them has finished",
            )
        frames = stream_frames(
            session,
            "StreamLedger",
            node_pb2.LedgerRequest(from_sequence=request.from_sequence).SerializeToString(),
            context.time_remaining(),
            node_pb2.LedgerEntry.FromString,
            on_behalf_of=pem,
        )
        try:
            yield from frames
        except grpc.RpcError as exc:
            code = getattr(exc, "code", None)
            details = getattr(exc, "details", None)
            context.abort(
                code() if callable(code) else grpc.StatusCode.UNKNOWN,
                (details() if callable(details) else None) or "the node's ledger stream failed",
            )
        finally:
            frames.close()  # a reader that went away: the node is told to stop
            slot.release()
