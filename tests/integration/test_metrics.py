"""A running node's /metrics after a release and a refusal, and its DEBUG JSON log.

The node is a real `chc-node serve` process (tests/integration/_serving.py) logging JSON at
DEBUG; its exact aggregates are computed with the node's own views in this process, and none
may appear anywhere in its log.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from datetime import date

import grpc
import pytest

from coordinator.local.synth.generate import generate_region
from coordinator.local.synth.regions import region_by_slug
from node.config import load_config
from node.data.store import OmopStore
from protocols.observability.health import check
from queries.spec import Measure, Query, Statistic
from tests.integration._serving import NodeProcess, sample, start_node

pytestmark = pytest.mark.integration

NODE = "nwc"
PERSONS = 30_000
COUNT_AND_AGE = Query(
    view="persons",
    rho=0.5,
    group_by=("sex",),
    measures=(
        Measure(),
        Measure(statistic=Statistic.SUM, name="age_sum", column="age", clamp=(0.0, 120.0)),
    ),
)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the module, stopped (and its exit awaited) at the end."""
    root = tmp_path_factory.mktemp("metrics")
    omop = root / "data" / NODE
    generate_region(region_by_slug(NODE), PERSONS, omop, seed=5)
    proc = start_node(root, omop, name=NODE, total_rho=5.0)
    try:
        yield proc
    finally:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            proc.popen.wait(timeout=60)


def test_metrics_after_a_release_and_a_refusal(node: NodeProcess) -> None:
    """Calls by code, queries by outcome, and rho spent as the node's reply says."""
    with node.channel() as channel:
        reply = node.execute(channel, COUNT_AND_AGE)
        with pytest.raises(grpc.RpcError) as refused:
            node.execute(channel, Query(view="persons", rho=50.0))  # above the per-query cap
    code = refused.value.code()
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    page = node.scrape()
    execute = {"service": "chc.v1.Node", "method": "Execute"}
    assert sample(page, "chc_rpc_requests_total", **execute, code="OK") == 1
    assert sample(page, "chc_rpc_requests_total", **execute, code=code.name) == 1
    assert sample(page, "chc_rpc_duration_seconds_count", **execute, code="OK") == 1
    assert sample(page, "chc_queries_total", method="Execute", outcome="released") == 1
    assert sample(page, "chc_queries_total", method="Execute", outcome="refused") == 1
    assert sample(page, "chc_node_rho_spent", node=NODE, analyst="") == pytest.approx(
        reply.budget.rho_spent
    )
    assert reply.budget.rho_spent == pytest.approx(0.5)
    assert sample(page, "chc_node_rho_total", node=NODE) == pytest.approx(5.0)
    assert "chc_ledger_append_seconds" in page  # observed once the ledger calls the hook


def test_debug_json_log_has_query_ids_and_no_exact_value(node: NodeProcess) -> None:
    """Every line is JSON with the fixed fields; the release's line names its query id."""
    with node.channel() as channel:
        reply = node.execute(channel, COUNT_AND_AGE)
        assert check(channel) == "SERVING"  # on the mTLS port: logged at DEBUG
    cfg = load_config(node.log.parent / "conf" / f"{NODE}.toml")
    assert cfg.reference_date == date(2025, 12, 31)
    store = OmopStore.from_config(cfg)
    try:
        with store.snapshot() as views:
            exact = views.query(
                "SELECT CAST(sex AS VARCHAR) AS sex, count(*) AS n, sum(age) AS age_sum "
                "FROM persons GROUP BY 1"
            ).to_pylist()
    finally:
        store.close()
    lines = node.log_lines()
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert line["node"] == NODE
    mine = [line for line in lines if line.get("query_id") == reply.query_id]
    assert mine, "no log line names the query id"
    assert any(line.get("method") == "Execute" and line.get("code") == "OK" for line in mine)
    assert any(line["level"] == "DEBUG" for line in lines)  # DEBUG really was on
    text = node.log.read_text(encoding="utf-8")
    for row in exact:
        assert row["n"] >= 1000  # large enough that no port, pid or time can contain it
        for value in (int(row["n"]), int(row["age_sum"])):
            # A whole word: a query id's hex digits may hold any digits by chance.
            found = re.search(rf"\b{value}\b", text)
            assert found is None, f"exact value {value} of {row['sex']} in the log"
    json.loads(json.dumps(lines))  # round-trips: nothing but JSON types
