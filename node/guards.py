"""The node's per-request guards: replayed envelopes, refusal rate limits and deadlines.

NonceStore refuses a replayed query envelope (seeded from the ledger, so a restart does not
forget), RefusalLimiter bounds how many refusals from one peer reach the ledger, and
check_deadline refuses at no cost once the caller has given up. Each holds only its own small
state and none touches the data or spends budget, so they are kept apart from the servicer
(node/service.py), which decides when each one applies.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import DecodeError

from protocols import serde
from protocols.ledger.entry import SignedEntry, read_fit
from protocols.security.envelope import now_ms
from protocols.v1 import node_pb2
from queries.errors import AuthenticationError, ChcError, DeadlineExceededError
from queries.results import BudgetStatus

if TYPE_CHECKING:
    from node.budget.accounting import Kept


class NothingKeptError(LookupError, ChcError):
    """A fetch-only re-send (ExecuteRequest.kept_only) found no release kept for its envelope."""

    status_name = "NOT_FOUND"


@dataclass(frozen=True)
class Admission:
    """What to do with one refusal: record it, and whether it starts rate limiting."""

    record: bool
    starts: bool  # the first refusal over the limit: recorded once, saying so
    refusals: int  # refusals from this peer in its window, this one included
    remaining_s: float  # until its window ends


class RefusalLimiter:
    """At most `limit` refusals per peer per window reach the ledger, plus one saying so.

    A peer's window opens at its first refusal (after its last window ended) and lasts
    `window_s`. Its first `limit` refusals are recorded; the next is recorded as the start of
    rate limiting; the rest until the window ends are answered but not recorded. So a peer
    that is refused without end costs at most limit + 1 entries per window.
    """

    # Peers tracked at once; beyond this (possible only without TLS, where the key is the
    # claimed analyst), peers whose windows have not ended share one window.
    MAX_PEERS = 10_000
    OTHERS = "(other callers)"

    def __init__(
        self, limit: int, window_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1 or not window_s > 0:
            raise ValueError("a refusal limit needs limit >= 1 and a positive window")
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}  # peer: (window start, refusals)
        self._lock = threading.Lock()

    def admit(self, peer: str) -> Admission:
        """Count one refusal from peer and say whether (and how) to record it."""
        with self._lock:
            now = self._clock()
            if peer not in self._windows and len(self._windows) >= self.MAX_PEERS:
                self._windows = {
                    p: w for p, w in self._windows.items() if now - w[0] < self.window_s
                }
                if len(self._windows) >= self.MAX_PEERS:
                    peer = self.OTHERS
            start, count = self._windows.get(peer, (now, 0))
            if now - start >= self.window_s:
                start, count = now, 0
            count += 1
            self._windows[peer] = (start, count)
        return Admission(
            record=count <= self.limit + 1,
            starts=count == self.limit + 1,
            refusals=count,
            remaining_s=max(0.0, start + self.window_s - now),
        )


def fit_key(nonce: bytes, step: int) -> bytes:
    """What a fit step claims in the NonceStore: one fit envelope is used once per step.

    Never equal to a query's 16-byte nonce claim, and distinct for every step.
    """
    return nonce + b"#fit" + step.to_bytes(4, "big")


@dataclass(frozen=True)
class Begun:
    """What NonceStore.begin decided for one Execute of an envelope.

    `owner`: this call runs the query and must call finish(). Otherwise the envelope was (or
    is being) answered: `pending` is set while another call with the same envelope runs, and
    once it is done (or at once if None) the caller looks for the release kept for it.
    """

    owner: bool
    pending: threading.Event | None = None


class NonceStore:
    """Nonces seen, kept until their envelope expires, so a replay is refused.

    A query envelope claims its nonce; a fit envelope claims fit_key(nonce, step) per step.
    Execute makes a query envelope idempotent (begin/finish): the same envelope again is
    answered with the release kept for it, and an attempt that ended without a charge frees
    its nonce, so a retry runs afresh.
    """

    def __init__(self) -> None:
        self._seen: dict[bytes, int] = {}
        # Envelopes being answered now: nonce -> (SHA-256 of the envelope, done).
        self._running: dict[bytes, tuple[bytes, threading.Event]] = {}
        self._lock = threading.Lock()

    def begin(self, nonce: bytes, digest: bytes) -> Begun:
        """Start answering an envelope, or say that it is (or was) answered by another call.

        Raises AuthenticationError if another envelope with this nonce is running now.
        """
        with self._lock:
            running = self._running.get(nonce)
            if running is not None:
                if running[0] != digest:
                    raise AuthenticationError(
                        "another envelope with this nonce is being answered; sign it again"
                    )
                return Begun(owner=False, pending=running[1])
            if nonce in self._seen and self._seen[nonce] > now_ms():
                return Begun(owner=False)
            # Held until finish(), which claims the nonce only if the attempt was charged.
            self._running[nonce] = (digest, threading.Event())
            return Begun(owner=True)

    def watch(self, nonce: bytes, digest: bytes) -> tuple[threading.Event | None, bool]:
        """For a fetch-only re-send: the event of a call answering this very envelope now
        (None if none), and whether the nonce is claimed. Claims and frees nothing."""
        with self._lock:
            running = self._running.get(nonce)
            pending = running[1] if running is not None and running[0] == digest else None
            return pending, self._seen.get(nonce, 0) > now_ms()

    def finish(self, nonce: bytes, expires_at_ms: int, *, charged: bool) -> None:
        """End an attempt begun by this call: a charged nonce stays claimed until it expires;
        an uncharged one is freed for a retry. Wakes any call waiting for it."""
        with self._lock:
            running = self._running.pop(nonce, None)
            if charged:
                self._seen[nonce] = expires_at_ms
        if running is not None:
            running[1].set()

    def claim(self, nonce: bytes, expires_at_ms: int, *, replayed: str | None = None) -> None:
        """Record a fresh nonce, or raise AuthenticationError (`replayed`) if seen before."""
        now = now_ms()
        with self._lock:
            if len(self._seen) > 10_000:
                self._seen = {n: e for n, e in self._seen.items() if e > now}
            if nonce in self._seen or nonce in self._running:
                raise AuthenticationError(
                    replayed or "this query envelope was already used; sign it again"
                )
            self._seen[nonce] = expires_at_ms

    def seed(self, entries: Iterable[SignedEntry]) -> int:
        """Remember the nonces of released queries still within their validity window.

        Without this a restarted node would accept a replay of an envelope it had already
        answered; the ledger is the durable record of what was released.
        """
        now = now_ms()
        seeded = 0
        for entry in entries:
            try:
                body = json.loads(entry.body)
                if body.get("outcome") != "released":
                    continue
                envelope = node_pb2.QueryEnvelope.FromString(base64.b64decode(body["envelope"]))
                fit = read_fit(body)
            except (ValueError, KeyError, TypeError, DecodeError):
                continue  # not a query entry (e.g. a signed head)
            if envelope.expires_at_ms > now:
                key = envelope.nonce if fit is None else fit_key(envelope.nonce, fit.step)
                self._seen[key] = envelope.expires_at_ms
                seeded += 1
        return seeded


# The longest a call waits for an earlier call answering the same request (a retry that
# came before the first reply) when the caller sent no deadline.
MAX_RESEND_WAIT_S = 600.0


def begin_or_kept(
    nonces: NonceStore,
    key: bytes,
    digest: bytes,
    context: grpc.ServicerContext,
    stored_release: Callable[[bytes], Kept | None],
    *,
    replayed: str,
) -> Kept | None:
    """Own the attempt at a request (None: the caller runs it and must nonces.finish(key)),
    or the release kept for an earlier call of the very same request (digest).

    A call of the same request still being answered is waited for (within the caller's
    deadline). Raises AuthenticationError(`replayed`) if the key was used by another request,
    or one that kept nothing.
    """
    while True:
        begun = nonces.begin(key, digest)
        if begun.owner:
            return None
        if begun.pending is not None:
            remaining = context.time_remaining()
            wait = MAX_RESEND_WAIT_S if remaining is None else min(remaining, MAX_RESEND_WAIT_S)
            if not begun.pending.wait(timeout=max(0.0, wait)):
                raise DeadlineExceededError(
                    "an earlier call with this same request is still being answered; "
                    "nothing more was charged: re-send it later to read its release"
                )
            continue
        kept = stored_release(digest)
        if kept is None:
            raise AuthenticationError(replayed)
        return kept


Reply = TypeVar("Reply", node_pb2.ExecuteResponse, node_pb2.FitStepResponse)


def kept_reply(kept: Kept, reply_type: type[Reply], budget: BudgetStatus) -> Reply:
    """A kept release as its reply again: marked resent, with its ledger entry's sequence and
    the budget as it is now (neither is part of what was kept)."""
    msg = reply_type.FromString(kept.response)
    msg.ledger_sequence = kept.sequence
    msg.budget.CopyFrom(serde.budget_to_proto(budget))
    msg.resent = True
    return msg


def check_deadline(context: grpc.ServicerContext, when: str) -> None:
    """Refuse at no cost if the caller's propagated deadline has passed or the call was
    cancelled (the caller went away, or a draining node's grace period ended)."""
    remaining = context.time_remaining()
    if (remaining is not None and remaining <= 0) or not context.is_active():
        raise DeadlineExceededError(
            f"the caller's deadline passed {when} the release; nothing was charged: "
            "allow more time (e.g. a longer --deadline)"
        )
