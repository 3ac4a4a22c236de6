"""SIGTERM drains a real node: queries in flight finish and are charged, new ones are refused.

A real `chc-node serve` process on a few hundred thousand synthetic persons, a burst of
concurrent quantile queries (each several hundred milliseconds on this machine when they
share two cores), SIGTERM while they run; then the ledger is verified with the auditors' tool.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coordinator.audit.sources import open_file
from coordinator.audit.verification import verify
from coordinator.local.synth.generate import generate_region
from coordinator.local.synth.regions import region_by_slug
from protocols.security.pki import CA_FILE
from queries.spec import Measure, Query, Statistic
from tests.integration._serving import NodeProcess, sample, start_node

pytestmark = pytest.mark.integration

NODE = "nwc"
PERSONS = 300_000
BURST = 10  # concurrent queries in flight at SIGTERM (the node has 16 worker threads)
HEAVY = Query(
    view="persons",
    rho=0.05,
    group_by=("sex", "imd_quintile", "age_band"),
    measures=tuple(
        Measure(statistic=Statistic.QUANTILE, name=f"q{i}", column="age", quantile=0.05 + 0.1 * i)
        for i in range(8)
    ),
)


@pytest.fixture(scope="module")
def omop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic region, written once for the module."""
    folder = tmp_path_factory.mktemp("drain-data") / NODE
    generate_region(region_by_slug(NODE), PERSONS, folder, seed=11)
    return folder


@pytest.fixture
def node(tmp_path: Path, omop: Path) -> Iterator[NodeProcess]:
    """A node of the test's own; killed at the end if the test left it running."""
    proc = start_node(tmp_path, omop, name=NODE)
    try:
        yield proc
    finally:
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait()


Replies = list[tuple[str, int, float]]  # (query_id, ledger sequence, when it arrived)


def _burst(node: NodeProcess) -> tuple[list[threading.Thread], Replies, list[grpc.StatusCode]]:
    """BURST threads that send one HEAVY query each at the same moment."""
    replies: Replies = []
    failures: list[grpc.StatusCode] = []
    lock = threading.Lock()
    start = threading.Barrier(BURST)

    def one() -> None:
        with node.channel() as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            start.wait(timeout=30)
            try:
                reply = node.execute(channel, HEAVY)
            except grpc.RpcError as exc:
                with lock:
                    failures.append(exc.code())
                return
            with lock:
                replies.append((reply.query_id, reply.ledger_sequence, time.monotonic()))

    threads = [threading.Thread(target=one) for _ in range(BURST)]
    for t in threads:
        t.start()
    return threads, replies, failures


def _wait_in_flight(node: NodeProcess, at_least: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = sample(node.scrape(), "chc_rpc_in_flight", method="Execute")
        if busy >= at_least:
            return int(busy)
        time.sleep(0.002)
    raise AssertionError(f"never saw {at_least} Execute calls in flight")


def _verified_releases(node: NodeProcess, ca_pem: bytes) -> dict[int, dict[str, object]]:
    result = verify(open_file(node.ledger), ca_pem=ca_pem)
    assert result.ok, [str(a) for a in result.anomalies]
    return {e.sequence: json.loads(e.body) for e in open_file(node.ledger).read() if not e.head}


def test_sigterm_lets_queries_in_flight_finish_and_refuses_new_ones(
    node: NodeProcess, tmp_path: Path
) -> None:
    """The burst's queries all answer and are charged; a query sent after SIGTERM is not."""
    assert node.health() == "SERVING"
    assert node.health("chc.v1.Node") == "SERVING"
    threads, replies, failures = _burst(node)
    seen = _wait_in_flight(node, BURST // 2)
    signalled = time.monotonic()
    os.kill(node.popen.pid, signal.SIGTERM)
    # The probe listener stays up through the drain and says NOT_SERVING at once.
    while node.health() != "NOT_SERVING":
        assert time.monotonic() - signalled < 10, "health still SERVING 10 s after SIGTERM"
        time.sleep(0.01)
    with node.channel() as late, pytest.raises(grpc.RpcError) as refused:
        node.execute(late, Query(view="persons", rho=0.01, group_by=("sex",)))
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    for t in threads:
        t.join(timeout=120)
    assert node.popen.wait(timeout=120) == 0, node.log.read_text()[-3000:]

    # Every call in flight at SIGTERM was answered; a call of the burst that had not reached
    # the node yet is refused UNAVAILABLE like any new one (seen once in CI: 1 of 10).
    assert all(code is grpc.StatusCode.UNAVAILABLE for code in failures), failures
    assert len(replies) + len(failures) == BURST
    assert len(replies) >= seen
    # The drain waited: answers arrived after SIGTERM, some after the late query's refusal.
    late_answers = sum(at > signalled for _, _, at in replies)
    assert late_answers, f"all {seen} queries seen in flight had finished before SIGTERM"
    ca_pem = (tmp_path / "pki" / CA_FILE).read_bytes()
    bodies = _verified_releases(node, ca_pem)
    for query_id, sequence, _ in replies:
        assert bodies[sequence]["query_id"] == query_id
        assert bodies[sequence]["outcome"] == "released"
    # Nothing was charged but the answered calls (refused ones and the late query never
    # reached the service).
    assert sum(b.get("outcome") == "released" for b in bodies.values()) == len(replies)
    lines = node.log_lines()
    drain = [line for line in lines if str(line["message"]).startswith("draining")]
    assert len(drain) == 1
    assert "call(s) in flight" in str(drain[0]["message"])
    assert any(str(line["message"]).startswith("drained in") for line in lines)


def test_a_second_signal_stops_at_once(node: NodeProcess, tmp_path: Path) -> None:
    """SIGTERM then SIGINT: the node exits 1 without waiting; its ledger still verifies."""
    threads, replies, _ = _burst(node)
    _wait_in_flight(node, BURST // 2)
    signalled = time.monotonic()
    os.kill(node.popen.pid, signal.SIGTERM)
    while (status := node.health()) != "NOT_SERVING":
        assert time.monotonic() - signalled < 10, f"health {status} 10 s after SIGTERM"
        time.sleep(0.01)
    os.kill(node.popen.pid, signal.SIGINT)
    assert node.popen.wait(timeout=30) == 1, node.log.read_text()[-3000:]
    for t in threads:
        t.join(timeout=60)
    bodies = _verified_releases(node, (tmp_path / "pki" / CA_FILE).read_bytes())
    # Whatever was answered before the stop was charged (no release without its entry).
    for query_id, sequence, _ in replies:
        assert bodies[sequence]["query_id"] == query_id
    assert any("second signal" in str(line["message"]) for line in node.log_lines())
