"""Crash safety of the ledger: a node killed with SIGKILL mid-run loses no charge.

Charge before release (docs/ledger.md): every result a client received must have its
ledger entry after the node is killed and restarted, and the chain must still verify.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from coordinator.audit.sources import open_file
from coordinator.audit.verification import verify
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from protocols import serde
from protocols.security.envelope import sign_query
from protocols.security.pki import CA_FILE, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import node_pb2, node_pb2_grpc
from queries.spec import Query, canonical_bytes

pytestmark = pytest.mark.integration

NODE = "nwc"
THREADS = 8
KILL_AFTER = 100  # releases received before the node is killed
TOTAL = 240  # releases received in all (at least 200 queries, as the acceptance asks)


def test_sigkill_mid_run_loses_no_charge(tmp_path: Path) -> None:
    folders = synth.generate_federation(8_000, tmp_path / "data", seed=3)
    setup = NodeSetup(name=NODE, omop=folders[NODE], total_rho=1e6, max_rho_per_query=1.0)
    received: list[tuple[str, int]] = []
    failures: list[grpc.StatusCode] = []
    lock = threading.Lock()
    stop = threading.Event()
    with LocalFederation(workdir=tmp_path, nodes=(setup,), deadline_ms=5_000) as fed:
        analyst = load_identity(fed.analyst_identity)
        address = f"127.0.0.1:{fed.node_port(NODE)}"
        query = canonical_bytes(Query(view="persons", rho=0.001, group_by=("sex",)))

        def worker() -> None:
            channel = secure_channel(address, analyst, server_name=NODE)
            while not stop.is_set():
                envelope = serde.signed_query_to_proto(sign_query(analyst, query))
                request = node_pb2.ExecuteRequest(envelope=envelope)
                try:
                    reply = node_pb2_grpc.NodeStub(channel).Execute(request, timeout=15)
                except grpc.RpcError as exc:
                    with lock:
                        failures.append(exc.code())
                    # A fresh channel reconnects at once, without gRPC's backoff.
                    channel.close()
                    time.sleep(0.05)
                    channel = secure_channel(address, analyst, server_name=NODE)
                    continue
                with lock:
                    received.append((reply.query_id, reply.ledger_sequence))
            channel.close()

        def wait_for(count: int, timeout_s: float) -> None:
            deadline = time.monotonic() + timeout_s
            while len(received) < count:
                assert time.monotonic() < deadline, f"only {len(received)} releases arrived"
                time.sleep(0.01)

        threads = [threading.Thread(target=worker) for _ in range(THREADS)]
        for t in threads:
            t.start()
        try:
            wait_for(KILL_AFTER, 120)
            fed.restart_node(NODE, sig=signal.SIGKILL)  # queries are in flight: a crash
            wait_for(TOTAL, 180)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        fed.stop_process(NODE)
        ca_pem = (fed.pki / CA_FILE).read_bytes()

    ledger = tmp_path / "conf" / f"{NODE}.ledger.sqlite"
    result = verify(open_file(ledger), ca_pem=ca_pem)
    assert result.ok, [str(a) for a in result.anomalies]
    bodies = {e.sequence: json.loads(e.body) for e in open_file(ledger).read() if not e.head}
    assert len(received) >= TOTAL
    assert len({seq for _, seq in received}) == len(received)
    for query_id, sequence in received:
        body = bodies.get(sequence)
        assert body is not None, f"release {query_id} (ledger #{sequence}) has no entry"
        assert body["query_id"] == query_id
        assert body["outcome"] == "released"
    assert grpc.StatusCode.UNAVAILABLE in failures  # the node really was down mid-run
    # Charges whose result was lost in the crash are in the ledger too; nothing else is.
    assert result.released >= len(received)
    assert result.released + result.refused + len(result.policies) == len(bodies)
