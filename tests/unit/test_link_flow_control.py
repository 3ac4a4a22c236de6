"""Flow control of streams over an outbound node's link (HubFrame.credit, protocol 1.3).

The hub once relayed a node's ledger through an unbounded queue: a slow auditor made the
hub hold as much of the ledger as the node could send, so any auditor certificate could
fill the hub's memory. Now the hub grants credit as its caller reads, the node sends only
what was granted, and a node that sends more has its call failed rather than buffered.
"""

from __future__ import annotations

import threading
import time

import grpc

from coordinator.hub.links import LinkSession, stream_frames
from node.link_context import LinkContext
from protocols.link_frames import STREAM_REFILL, STREAM_WINDOW
from protocols.v1 import link_pb2


def _sent(session: LinkSession) -> list[link_pb2.HubFrame]:
    """The frames the session has queued for the node so far."""
    out = []
    while not session.outgoing.empty():
        frame = session.outgoing.get_nowait()
        assert frame is not None
        out.append(frame)
    return out


def _entry(call_id: int, n: int) -> link_pb2.NodeFrame:
    return link_pb2.NodeFrame(call_id=call_id, response=str(n).encode())


def test_a_stream_asks_for_a_window_and_grants_more_only_as_its_caller_reads() -> None:
    session = LinkSession("gm", "gm")
    frames = stream_frames(session, "StreamLedger", b"", 30.0, bytes.decode)
    # The call goes out when the caller starts reading; feed it from the "node" meanwhile.
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(next(frames)))
    reader.start()
    deadline = time.monotonic() + 5
    while session.outgoing.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    (call,) = _sent(session)
    assert call.method == "StreamLedger"
    assert call.credit == STREAM_WINDOW
    for n in range(STREAM_WINDOW):  # the node sends all it may
        session.receive(_entry(call.call_id, n))
    reader.join(5)
    assert first == ["0"]
    assert _sent(session) == []  # one read: nothing granted yet
    read = [next(frames) for _ in range(STREAM_REFILL - 1)]
    assert read == [str(n) for n in range(1, STREAM_REFILL)]
    (grant,) = _sent(session)
    assert (grant.call_id, grant.credit, grant.method) == (call.call_id, STREAM_REFILL, "")
    frames.close()


def test_a_node_that_sends_beyond_its_credit_is_stopped_not_buffered() -> None:
    session = LinkSession("gm", "gm")
    pending = session.call("StreamLedger", b"", timeout_s=30.0, streaming=True)
    call_id = _sent(session)[0].call_id
    for n in range(STREAM_WINDOW + 10):
        session.receive(_entry(call_id, n))
    # What was granted is kept, then the call ends: nothing beyond the window is held.
    assert pending.frames.qsize() == STREAM_WINDOW + 1
    assert (
        pending.done.result(timeout=1).status.code == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    )
    assert [f.cancel for f in _sent(session)] == [True]  # and the node is told to stop


def test_a_node_before_flow_control_streams_as_before() -> None:
    session = LinkSession("gm", "gm", flow_control=False)
    pending = session.call("StreamLedger", b"", timeout_s=30.0, streaming=True)
    (call,) = _sent(session)
    assert call.credit == 0  # no limit asked for: a 1.2 node would not know the field
    for n in range(3 * STREAM_WINDOW):
        session.receive(_entry(call.call_id, n))
    assert pending.frames.qsize() == 3 * STREAM_WINDOW
    assert not pending.done.done()


def test_the_node_waits_for_credit_and_stops_waiting_when_cancelled_or_late() -> None:
    granted = LinkContext(caller_pem=b"", deadline_ms=0, peer="t", credit=2)
    assert granted.take_credit()
    assert granted.take_credit()
    took: list[bool] = []
    waiter = threading.Thread(target=lambda: took.append(granted.take_credit()))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive(), "the third message went without credit"
    granted.grant(1)
    waiter.join(5)
    assert took == [True]

    cancelled = LinkContext(caller_pem=b"", deadline_ms=0, peer="t", credit=1)
    assert cancelled.take_credit()
    waiter = threading.Thread(target=lambda: took.append(cancelled.take_credit()))
    waiter.start()
    cancelled.cancel()
    waiter.join(5)
    assert took == [True, False]

    late = LinkContext(caller_pem=b"", deadline_ms=200, peer="t", credit=1)
    assert late.take_credit()
    began = time.monotonic()
    assert not late.take_credit()
    assert time.monotonic() - began < 5

    unlimited = LinkContext(caller_pem=b"", deadline_ms=0, peer="t")  # a hub before 1.3
    assert all(unlimited.take_credit() for _ in range(10 * STREAM_WINDOW))
