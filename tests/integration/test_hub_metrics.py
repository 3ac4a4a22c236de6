"""A running hub's /metrics: node status from its fan-outs, pooling time, calls by code.

A real four-node federation whose hub.toml sets metrics_listen; one node is stopped, so the
hub's last fan-out reports it unreachable while the others are ok.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from protocols.process import read_ready_file
from queries.spec import Query
from tests.integration._serving import sample

pytestmark = pytest.mark.integration


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[LocalFederation]:
    folders = synth.generate_federation(2_000, tmp_path / "data", seed=13)
    setups = tuple(NodeSetup(name=r.slug, omop=folders[r.slug]) for r in synth.REGIONS)
    with LocalFederation(
        workdir=tmp_path,
        nodes=setups,
        deadline_ms=5_000,
        hub_extra_toml='metrics_listen = "127.0.0.1:0"\n',
    ) as federation:
        yield federation


def _scrape(fed: LocalFederation) -> str:
    ready = read_ready_file(fed.workdir / "run" / "hub.ready")
    assert ready is not None
    url = f"http://127.0.0.1:{ready['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as page:
        return str(page.read().decode())


def test_hub_metrics_show_each_nodes_status_and_the_pooling(fed: LocalFederation) -> None:
    fed.stop_process("gm")
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        result = client.query(Query(view="persons", rho=0.05, group_by=("sex",)), deadline_s=3)
    assert result.partial
    text = _scrape(fed)
    status = "chc_hub_node_status"
    assert sample(text, status, node="gm", chc_hub_node_status="unreachable") == 1
    assert sample(text, status, node="gm", chc_hub_node_status="ok") == 0
    for node in ("nenc", "nwc", "yh"):
        assert sample(text, status, node=node, chc_hub_node_status="ok") == 1
        assert sample(text, "chc_hub_node_replies_total", node=node, status="ok") >= 1
    assert sample(text, "chc_hub_combine_seconds_count") == 1
    assert sample(text, "chc_rpc_requests_total", method="Submit", code="OK") == 1
