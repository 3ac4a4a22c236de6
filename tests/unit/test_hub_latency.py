"""Per-node latency: the hub's operator sees it in the log; analysts never receive it.

A node's latency is mostly its exact DuckDB run time, which depends on its data and carries no
noise, so the hub keeps it out of every result it returns (NodeOutcome.latency_ms is 0).
"""

from __future__ import annotations

import io
import logging

import grpc
import pytest
from rich.console import Console

from coordinator.analyst import report
from coordinator.hub.fanout import Reply
from coordinator.hub.service import _combine
from protocols import serde
from protocols.v1 import hub_pb2
from queries.results import (
    BudgetStatus,
    NodeRelease,
    NodeStatus,
    NoiseInfo,
    ReleaseRules,
    release_schema,
)
from queries.spec import Query

BUDGET = BudgetStatus(rho_total=10.0, rho_spent=1.0, max_rho_per_query=1.0, delta=1e-6)
QUERY = Query(view="persons", rho=0.1)


def replies() -> list[Reply[object]]:
    """One node that answered after 1234.4 ms and one unreachable after 5000 ms."""
    # An empty release keeps this test about latency, whatever the components of a count are.
    release = NodeRelease(
        query_id="q-leeds",
        table=release_schema(()).empty_table(),
        noise=NoiseInfo("discrete_gaussian", 4.0, 16.0, 1.0),
        rho_charged=0.1,
        epsilon=1.0,
        budget=BUDGET,
    )
    return [
        Reply(
            "leeds", NodeStatus.OK, serde.release_to_proto(release), "", grpc.StatusCode.OK, 1234.4
        ),
        Reply("hull", NodeStatus.UNREACHABLE, None, "down", grpc.StatusCode.UNAVAILABLE, 5000.0),
    ]


def test_analysts_receive_no_latency() -> None:
    result = _combine(QUERY, replies(), ReleaseRules())
    assert [o.status for o in result.nodes] == [NodeStatus.OK, NodeStatus.UNREACHABLE]
    assert [o.latency_ms for o in result.nodes] == [0.0, 0.0]
    # What goes on the wire to the analyst.
    wire = hub_pb2.SubmitResponse.FromString(serde.result_to_proto(result).SerializeToString())
    assert [n.latency_ms for n in wire.nodes] == [0.0, 0.0]


def test_the_operator_log_has_the_latency(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="coordinator.hub.service"):
        result = _combine(QUERY, replies(), ReleaseRules(), analyst="alice")
    logged = [r.getMessage() for r in caplog.records if r.name == "coordinator.hub.service"]
    assert logged == [
        f"query {result.query_id} from alice: leeds=ok in 1234 ms, hull=unreachable in 5000 ms"
    ]


def test_the_report_shows_no_latency() -> None:
    result = _combine(QUERY, replies(), ReleaseRules())
    nodes = report.result_to_dict(result, QUERY)["nodes"]
    assert all("latency_ms" not in n for n in nodes)
    out = io.StringIO()
    report.print_nodes(Console(file=out, width=120), result)
    header = next(line for line in out.getvalue().splitlines() if "Status" in line)
    columns = [c.strip() for c in header.split("┃")[1:-1]]
    assert columns == ["Node", "Status", "rho spent", "Receipt", "rho used / total", "Note"]
