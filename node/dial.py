"""Outbound-only mode: the node dials the hub and serves the hub's calls over that link.

Hospital firewalls rarely let a connection in to a server beside patient data, so the node
opens one long-lived mutual-TLS stream to the hub (NodeLink.Connect, protocols/v1/link.proto)
and the hub sends its Describe/Explain/Execute/FitStep/StreamLedger calls down it. Each call
is answered by the same NodeService methods an inbound call reaches, with a LinkContext
(node/link_context.py) whose caller is the hub as verified when the link opened: the
analyst's signature is still verified here, the charge still comes before the release and
refusals are still recorded. Before serving anything the node checks the hub: TLS accepts
only a certificate carrying hub_name, and the hub's first frame must prove, with a
signature over this node's name and a fresh challenge, that it holds a hub-role certificate
of that name (a party with any other certificate of that name gets nothing served).

The link is re-opened with exponential backoff and jitter (protocols/retries.backoff_s),
forever, each loss logged once. docs/outbound.md says how it works and what the hub can do.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from google.protobuf.message import DecodeError

from node.link_context import LinkAbortError, LinkContext
from node.service import NodeService
from protocols import serde
from protocols.link_frames import (
    HEARTBEAT_S,
    LEDGER_KEY,
    MAX_LINK_STREAMS,
    MIN_CHALLENGE_BYTES,
    NODE_SERVICE,
    SILENT_AFTER_S,
    STREAM_METHODS,
    UNARY_METHODS,
    Party,
    check_certificate,
    check_signature,
    ledger_key_payload,
    sign,
    status_frame,
    welcome_payload,
)
from protocols.observability.health import Health
from protocols.observability.metrics import Metrics
from protocols.process import HANDLER_WAIT_S, Drained
from protocols.retries import backoff_s
from protocols.security.envelope import now_ms
from protocols.security.pki import Identity, Role
from protocols.security.tls import secure_channel
from protocols.v1 import link_pb2, link_pb2_grpc, node_pb2_grpc
from protocols.version import ProtocolMismatchError, ProtocolVersion, check_compatible
from queries.errors import AuthenticationError, ChcError

log = logging.getLogger("chc.node.dial")

# Re-dialling: the first wait, doubling up to the last (each jittered in [half, all]).
FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 3.0
# Calls answered at once over one link (as an inbound server's worker threads).
LINK_WORKERS = 16


@dataclass(frozen=True)
class _Details(grpc.HandlerCallDetails):
    """What the metrics interceptor reads of a call: its full method name."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class _Collector:
    """Stands in for a grpc.Server to collect the Node service's method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """Not needed: the registered handlers below are the same ones."""
        del handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """The handlers by method name (as gRPC 1.6x+ registers them)."""
        del service
        self.handlers.update(handlers)


def method_handlers(
    service: NodeService, metrics: Metrics | None
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The Node service's handlers by method, wrapped in the metrics interceptor if given.

    The same handlers (and so the same deserializers, servicer methods and counters) as
    an inbound server registers, so a linked call is counted, timed and logged like one.
    """
    collector = _Collector()
    node_pb2_grpc.add_NodeServicer_to_server(service, collector)  # type: ignore[arg-type]
    if metrics is None:
        return collector.handlers
    interceptor = metrics.interceptor()
    wrapped = {}
    for name, handler in collector.handlers.items():
        found = interceptor.intercept_service(
            functools.partial(_same, handler), _Details(method=NODE_SERVICE + name)
        )
        wrapped[name] = found if found is not None else handler
    return wrapped


def _same(
    handler: grpc.RpcMethodHandler[Any, Any], details: grpc.HandlerCallDetails
) -> grpc.RpcMethodHandler[Any, Any]:
    del details
    return handler


class Dialer:
    """Keeps one link to the hub open and answers the calls that come over it."""

    def __init__(
        self,
        service: NodeService,
        identity: Identity,
        *,
        address: str,
        hub_name: str,
        metrics: Metrics | None = None,
        is_revoked: Callable[[x509.Certificate], bool] | None = None,
    ) -> None:
        self.service = service
        self.identity = identity
        self.address = address
        self.hub_name = hub_name
        self._is_revoked = is_revoked
        self._handlers = method_handlers(service, metrics)
        self._pool = futures.ThreadPoolExecutor(LINK_WORKERS, thread_name_prefix="chc-link")
        # Ledger streams on workers of their own: a stream waits for its reader's credit
        # (HubFrame.credit), so streams nobody reads must never hold up queries.
        self._streams = futures.ThreadPoolExecutor(
            MAX_LINK_STREAMS, thread_name_prefix="chc-link-stream"
        )
        self._stop = threading.Event()
        self._accepting = True
        self._lock = threading.Lock()
        self._calls: dict[int, LinkContext] = {}  # the current link's calls being answered
        self._stream: grpc.Call | None = None
        self._thread: threading.Thread | None = None
        # Set while a link is open and the hub proven (tests and the logs read it).
        self.linked = threading.Event()

    def start(self) -> None:
        """Dial in a background thread (returns at once; the hub may not be up yet)."""
        self._thread = threading.Thread(target=self._run, name="chc-dial", daemon=True)
        self._thread.start()

    def stop_accepting(self) -> None:
        """Refuse new calls UNAVAILABLE from now on (a drain); calls in flight go on."""
        self._accepting = False

    def cancel_calls(self) -> None:
        """Tell every call in flight that its caller has gone (the end of a drain's grace)."""
        with self._lock:
            calls = list(self._calls.values())
        for context in calls:
            context.cancel()

    def close(self) -> None:
        """Close the link and stop dialling."""
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()  # type: ignore[no-untyped-call]
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._streams.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        attempt = 0
        quiet = False  # a failure was logged: the next ones go to DEBUG until linked again
        while not self._stop.is_set():
            linked, reason = self._link()
            if self._stop.is_set():
                break
            if linked:
                attempt, quiet = 0, False
                log.warning(
                    "lost the link to the hub at %s (%s); dialling again with backoff",
                    self.address,
                    reason,
                )
            elif not quiet:
                log.warning(
                    "cannot link to the hub at %s: %s; dialling again with backoff (further "
                    "failures are logged at DEBUG until linked)",
                    self.address,
                    reason,
                )
                quiet = True
            else:
                log.debug("cannot link to the hub at %s: %s", self.address, reason)
            attempt += 1
            self._stop.wait(backoff_s(attempt, first_s=FIRST_BACKOFF_S, max_s=MAX_BACKOFF_S))

    def _link(self) -> tuple[bool, str]:
        """One link, from dialling until it ends: (whether the hub was proven, why it ended)."""
        channel = secure_channel(self.address, self.identity, server_name=self.hub_name)
        outgoing: queue.Queue[link_pb2.NodeFrame | None] = queue.Queue()
        challenge = os.urandom(32)
        outgoing.put(
            link_pb2.NodeFrame(
                hello=link_pb2.LinkHello(
                    node=self.service.name,
                    protocol_version=serde.PROTOCOL_VERSION,
                    challenge=challenge,
                )
            )
        )
        stream = link_pb2_grpc.NodeLinkStub(channel).Connect(_frames(outgoing))
        self._stream = stream
        seen = [time.monotonic()]
        done = threading.Event()
        watchdog = threading.Thread(
            target=_watch, args=(stream, seen, done), name="chc-link-watch", daemon=True
        )
        watchdog.start()
        linked = False
        try:
            frames = iter(stream)
            first = next(frames, None)
            if first is None:
                return False, "the hub closed the link before proving who it is"
            seen[0] = time.monotonic()
            hub = self._check_welcome(first, challenge)
            linked = True
            self.linked.set()
            log.info("linked to hub %s at %s (outbound-only)", hub.name, self.address)
            beat = threading.Thread(
                target=_heartbeats, args=(outgoing, done), name="chc-link-beat", daemon=True
            )
            beat.start()
            for frame in frames:
                seen[0] = time.monotonic()
                self._receive(frame, hub, outgoing)
            return linked, "the hub ended the link"
        except AuthenticationError as exc:
            log.error(
                "refusing to serve %s: it did not prove it is hub %r (%s)",
                self.address,
                self.hub_name,
                exc,
            )
            return False, f"refused: {exc}"
        except ProtocolMismatchError as exc:
            log.error("refusing to serve %s: %s", self.address, exc)
            return False, f"refused: {exc}"
        except grpc.RpcError as exc:
            return linked, _describe(exc)
        finally:
            self.linked.clear()
            done.set()
            outgoing.put(None)
            stream.cancel()  # type: ignore[no-untyped-call]
            self.cancel_calls()
            channel.close()

    def _check_welcome(self, frame: link_pb2.HubFrame, challenge: bytes) -> Party:
        """The hub, proven by its welcome: role hub, name hub_name, signed for this link."""
        if not frame.HasField("welcome"):
            raise AuthenticationError("its first frame is not a welcome")
        welcome = frame.welcome
        hub = check_certificate(
            welcome.hub_certificate,
            self.identity.ca_pem,
            role=Role.HUB,
            name=self.hub_name,
            what="the hub's certificate",
            is_revoked=self._is_revoked,
        )
        payload = welcome_payload(hub.name, self.service.name, challenge)
        check_signature(hub, welcome.signature, payload, "the hub's welcome")
        # Another minor version is served (protocols/version.py); another major is not.
        check_compatible(
            ProtocolVersion.parse(welcome.protocol_version),
            them=f"hub {hub.name}",
            us=self.service.party,
        )
        return hub

    def _receive(
        self,
        frame: link_pb2.HubFrame,
        hub: Party,
        outgoing: queue.Queue[link_pb2.NodeFrame | None],
    ) -> None:
        if frame.cancel:
            with self._lock:
                context = self._calls.get(frame.call_id)
            if context is not None:
                context.cancel()
            return
        if not frame.method:
            if frame.credit:  # the hub's caller read some of a stream: send more
                with self._lock:
                    streaming = self._calls.get(frame.call_id)
                if streaming is not None:
                    streaming.grant(frame.credit)
            return  # else a heartbeat
        if not self._accepting:
            outgoing.put(
                status_frame(
                    frame.call_id,
                    grpc.StatusCode.UNAVAILABLE,
                    f"node {self.service.name} is draining (shutting down)",
                )
            )
            return
        context = LinkContext(
            caller_pem=hub.pem,
            deadline_ms=frame.deadline_ms,
            peer=f"link:{self.address}",
            credit=frame.credit if frame.method in STREAM_METHODS else 0,
        )
        with self._lock:
            self._calls[frame.call_id] = context
        pool = self._streams if frame.method in STREAM_METHODS else self._pool
        pool.submit(self._answer, frame, hub, context, outgoing)

    def _answer(
        self,
        frame: link_pb2.HubFrame,
        hub: Party,
        context: LinkContext,
        outgoing: queue.Queue[link_pb2.NodeFrame | None],
    ) -> None:
        call_id = frame.call_id
        try:
            for reply in self._replies(frame, hub, context):
                outgoing.put(reply)
        except LinkAbortError:
            code = context.code() or grpc.StatusCode.UNKNOWN
            outgoing.put(status_frame(call_id, code, context.details() or "", context.trailers()))
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("internal error (ref %s) answering %s over the link", ref, frame.method)
            outgoing.put(
                status_frame(
                    call_id,
                    grpc.StatusCode.INTERNAL,
                    f"internal error (ref {ref}); the operator can find it in the server log",
                )
            )
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def _replies(
        self, frame: link_pb2.HubFrame, hub: Party, context: LinkContext
    ) -> Iterator[link_pb2.NodeFrame]:
        """The frames that answer one call (one for a unary call, one per entry and an end
        for StreamLedger); refusals raise LinkAbortError through context.abort."""
        call_id, method = frame.call_id, frame.method
        if frame.on_behalf_of:
            # The hub relays for an auditor: the node checks the auditor's certificate itself
            # and the servicer then sees the auditor as the caller.
            try:
                auditor = check_certificate(
                    frame.on_behalf_of,
                    self.identity.ca_pem,
                    role=Role.AUDITOR,
                    what="the certificate the hub relays for",
                    is_revoked=self._is_revoked,
                )
            except ChcError as exc:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            if method not in STREAM_METHODS and method != LEDGER_KEY:
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"hub {hub.name} may relay only ledger reads for auditors, not {method}",
                )
            context.act_for(auditor.pem, peer=f"link:{self.address} for {auditor.name}")
        if method == LEDGER_KEY:
            yield self._ledger_key(frame, context)
            return
        handler = self._handlers.get(method)
        if handler is None or method not in UNARY_METHODS | STREAM_METHODS:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"method {method!r} is not served over the link"
            )
        try:
            request = handler.request_deserializer(frame.request)  # type: ignore[misc]
        except DecodeError:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the {method} request could not be decoded"
            )
        serialize: Callable[[Any], bytes] = handler.response_serializer  # type: ignore[assignment]
        ok = grpc.StatusCode.OK
        if method in STREAM_METHODS:
            for item in handler.unary_stream(request, context):  # type: ignore[misc]
                # Sent only as the hub grants credit, so a slow reader slows this stream
                # rather than filling the hub's memory (HubFrame.credit).
                if not context.take_credit():
                    if context.is_active():
                        context.abort(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            "the deadline passed while the stream waited for its reader",
                        )
                    context.abort(grpc.StatusCode.CANCELLED, "the hub cancelled the call")
                yield link_pb2.NodeFrame(call_id=call_id, response=serialize(item))
            yield status_frame(call_id, ok, "")
            return
        response = handler.unary_unary(request, context)  # type: ignore[misc]
        done = status_frame(call_id, ok, "", context.trailers())
        done.response = serialize(response)
        yield done

    def _ledger_key(self, frame: link_pb2.HubFrame, context: LinkContext) -> link_pb2.NodeFrame:
        """The ledger key statement for an auditor's challenge (auditors only)."""
        if not frame.on_behalf_of:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, "the ledger key is signed for auditors only"
            )
        request = link_pb2.NodeLedgerRequest.FromString(frame.request)
        if len(request.challenge) < MIN_CHALLENGE_BYTES:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"challenge: give at least {MIN_CHALLENGE_BYTES} random bytes",
            )
        key = self.service.accountant.public_key
        statement = link_pb2.LedgerKeyStatement(
            node=self.service.name,
            ledger_public_key=key,
            node_certificate=self.identity.cert_pem,
            signature=sign(
                self.identity, ledger_key_payload(self.service.name, key, request.challenge)
            ),
        )
        done = status_frame(frame.call_id, grpc.StatusCode.OK, "")
        done.response = statement.SerializeToString()
        return done


def _frames(outgoing: queue.Queue[link_pb2.NodeFrame | None]) -> Iterator[link_pb2.NodeFrame]:
    """The node's side of the stream, until None is queued."""
    while True:
        frame = outgoing.get()
        if frame is None:
            return
        yield frame


def _heartbeats(outgoing: queue.Queue[link_pb2.NodeFrame | None], done: threading.Event) -> None:
    while not done.wait(HEARTBEAT_S):
        outgoing.put(link_pb2.NodeFrame(heartbeat=link_pb2.Heartbeat(sent_at_ms=now_ms())))


def _watch(stream: grpc.Call, seen: list[float], done: threading.Event) -> None:
    """Cancel a link the hub has been silent on for too long (a hub that froze, a cut
    cable without a TCP reset), so that the node dials again instead of waiting forever."""
    while not done.wait(HEARTBEAT_S / 2):
        if time.monotonic() - seen[0] > SILENT_AFTER_S:
            log.warning("the hub has sent nothing for %g s: closing the link", SILENT_AFTER_S)
            stream.cancel()  # type: ignore[no-untyped-call]
            return


def _describe(exc: grpc.RpcError) -> str:
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    name = code().name if callable(code) else "error"
    text = details() if callable(details) else ""
    return f"{name}: {text}" if text else name


def serve_until_signalled(
    dialer: Dialer,
    server: grpc.Server | None,
    *,
    grace: float,
    health: Health,
    metrics: Metrics,
) -> Drained:
    """protocols.process.serve_until_signalled for a node that dials (and may also listen).

    The drain is the same: health NOT_SERVING, no new calls (over the link they are refused
    UNAVAILABLE, so the hub reports the node unreachable), calls in flight get grace seconds,
    then they are told their caller has gone (a query not yet charged is then refused at no
    cost); a second signal stops at once.
    """
    signals: list[int] = []

    def _handler(signum: int, frame: object) -> None:
        del frame
        signals.append(signum)  # counts only: see protocols/process.py

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    while not signals:
        time.sleep(0.1)
    log.info("received %s", signal.Signals(signals[0]).name)
    began = time.monotonic()
    health.drain()
    dialer.stop_accepting()
    log.info("draining: %d call(s) in flight get up to %g s", metrics.in_flight_total(), grace)
    stopped = server.stop(grace) if server is not None else None
    forced = False
    while time.monotonic() - began < grace and metrics.in_flight_total():
        if len(signals) > 1:
            forced = True
            break
        metrics.wait_idle(timeout=0.05)
    finished = not forced and metrics.in_flight_total() == 0
    dialer.cancel_calls()
    if stopped is not None and not forced:
        stopped.wait(timeout=HANDLER_WAIT_S)
    deadline = began + grace + HANDLER_WAIT_S
    while not forced and metrics.in_flight_total() and time.monotonic() < deadline:
        if len(signals) > 1:
            forced = True
            break
        metrics.wait_idle(timeout=0.05)
    if forced and server is not None:
        server.stop(0)
    dialer.close()
    busy = metrics.in_flight_total()
    return Drained(
        finished=finished and busy == 0,
        forced=forced,
        busy=busy,
        seconds=time.monotonic() - began,
    )
