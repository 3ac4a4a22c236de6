"""The ServicerContext of a call that came over an outbound link (node/dial.py).

NodeService reads who is calling from the context's auth context (the caller's verified
certificate), its deadline from time_remaining, whether the caller is still there from
is_active, and ends refusals with abort. Over a link the caller is the hub whose certificate
the node verified when the link opened, or the auditor the hub relays for (whose certificate
the node verified for this call); the deadline is the one the hub sent with the call; abort
ends the call with a status frame. So the servicer's guarantees hold unchanged: it cannot
tell a linked call from an inbound one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import grpc


class LinkAbortError(Exception):
    """Raised by LinkContext.abort: the call ends with the context's code and details."""


class LinkContext(grpc.ServicerContext):
    """A call's context: caller certificate, deadline, cancellation, status and trailers."""

    def __init__(self, *, caller_pem: bytes, deadline_ms: int, peer: str, credit: int = 0) -> None:
        self._caller_pem = caller_pem
        self._deadline = time.monotonic() + deadline_ms / 1000 if deadline_ms > 0 else None
        self._peer = peer
        self._cancelled = threading.Event()
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self._trailers: tuple[tuple[str, str | bytes], ...] = ()
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        # A stream's flow control (HubFrame.credit): messages the hub lets the node send
        # before it waits; None when the hub asked for none (before protocol 1.3).
        self._credit: int | None = credit if credit > 0 else None
        self._granted = threading.Condition(self._lock)

    def act_for(self, caller_pem: bytes, *, peer: str) -> None:
        """Make the caller another party the link relays for (an auditor the node checked)."""
        self._caller_pem, self._peer = caller_pem, peer

    # What NodeService and the metrics interceptor read.

    def auth_context(self) -> Mapping[str, Any]:
        """The caller's certificate, as gRPC gives a mutual-TLS peer's."""
        return {"x509_pem_cert": [self._caller_pem], "transport_security_type": [b"ssl"]}

    def time_remaining(self) -> float | None:  # type: ignore[override]  # None: no deadline
        """Seconds left of the deadline the hub sent (None: none was sent)."""
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        """False once the hub cancelled the call or the link was lost."""
        return not self._cancelled.is_set()

    def cancel(self) -> None:
        """The caller went away (a cancel frame, a lost link, the end of a drain)."""
        self._cancelled.set()
        with self._lock:
            callbacks, self._callbacks = self._callbacks, []
            self._granted.notify_all()  # a stream waiting for credit ends now
        for callback in callbacks:
            callback()

    def grant(self, credit: int) -> None:
        """The hub lets the stream send `credit` more messages (its caller read some)."""
        with self._granted:
            if self._credit is not None:
                self._credit += credit
                self._granted.notify_all()

    def take_credit(self) -> bool:
        """Wait until the hub lets one more message of the stream go and take it; False if
        the call was cancelled or its deadline passed first. Without flow control, True."""
        with self._granted:
            while self._credit is not None and self._credit <= 0:
                left = self.time_remaining()
                if self._cancelled.is_set() or (left is not None and left <= 0):
                    return False
                self._granted.wait(timeout=left)
            if self._credit is not None:
                self._credit -= 1
            return not self._cancelled.is_set()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Call callback when the call is cancelled."""
        with self._lock:
            self._callbacks.append(callback)
        return True

    def peer(self) -> str:
        """Where the call came from, for the logs (the link's hub address)."""
        return self._peer

    def peer_identities(self) -> Iterable[bytes] | None:
        """The caller's certificate's name is in auth_context; gRPC's list is not kept."""
        return None

    def peer_identity_key(self) -> str | None:
        """As gRPC says for a mutual-TLS peer."""
        return "x509_pem_cert"

    def invocation_metadata(self) -> Any:
        """The hub sends no call metadata over the link."""
        return ()

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        """Nothing to send: a link's calls carry no metadata before their answer."""
        del initial_metadata

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        """Kept for the status frame (e.g. what a refused fit step charged)."""
        self._trailers = tuple(trailing_metadata)

    def trailers(self) -> tuple[tuple[str, str | bytes], ...]:
        """The trailing metadata set by the servicer."""
        return self._trailers

    def set_code(self, code: grpc.StatusCode) -> None:
        """The status the call ends with."""
        self._code = code

    def set_details(self, details: str) -> None:
        """The message the call ends with."""
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        """The status set by abort or set_code (None: not set)."""
        return self._code

    def details(self) -> str | None:
        """The message set by abort or set_details."""
        return self._details

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        """End the call with code and details (as a status frame)."""
        self._code, self._details = code, details
        raise LinkAbortError(details)

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        """End the call with a grpc.Status."""
        self.set_trailing_metadata(status.trailing_metadata or ())
        self.abort(status.code, status.details)
