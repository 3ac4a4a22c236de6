"""A linked node that has gone silent is unreachable at once, whatever the send loop does.

CI once saw a SIGSTOPped outbound node reported timed_out rather than unreachable: silence
was only noticed by the hub's send loop between frames, so a call made after the node had
been silent for longer than SILENT_AFTER_S was still queued on its session and waited for
its deadline.
"""

from __future__ import annotations

import time

import grpc

from coordinator.hub.links import Links, LinkSession
from protocols.link_frames import SILENT_AFTER_S


def _silent(session: LinkSession) -> None:
    session.last_seen = time.monotonic() - SILENT_AFTER_S - 0.5


def test_a_call_to_a_silent_session_fails_unavailable_at_once() -> None:
    session = LinkSession("manchester", "manchester")
    _silent(session)
    pending = session.call("Describe", b"", timeout_s=3.0)
    frame = pending.done.result(timeout=0.1)  # no waiting for the deadline
    assert frame.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "sent nothing" in frame.status.details
    assert session.closed.is_set()


def test_a_silent_node_has_no_session() -> None:
    links = Links(frozenset({"manchester"}))
    session = links.open("manchester", "manchester")
    assert links.session("manchester") is session
    _silent(session)
    assert links.session("manchester") is None
    assert session.closed.is_set()


def test_a_call_waiting_on_a_node_that_falls_silent_fails_before_its_deadline() -> None:
    links = Links(frozenset({"manchester"}))
    session = links.open("manchester", "manchester")
    pending = session.call("Describe", b"", timeout_s=30.0)
    # Nobody runs the send loop here: the watchdog alone must notice the silence.
    session.last_seen = time.monotonic() - SILENT_AFTER_S + 0.5
    frame = pending.done.result(timeout=3.0)
    assert frame.status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    links.close_all("test over")


def test_a_session_that_hears_from_its_node_stays_open() -> None:
    session = LinkSession("manchester", "manchester")
    session.last_seen = time.monotonic() - SILENT_AFTER_S + 1.0
    pending = session.call("Describe", b"", timeout_s=3.0)
    assert not pending.done.done()
    assert not session.closed.is_set()
