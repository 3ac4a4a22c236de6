"""The Python client against a real federation: Federation.connect(), result frames and the
notebook views of results and explanations (real nodes and hub on loopback, mTLS, real noise).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from chc import POOLED, ConfigError, Explanation, Federation, HubUnavailableError, parse_sql
from coordinator.local import demo
from coordinator.local.federation import LocalFederation
from queries.results import NodeStatus

pytestmark = pytest.mark.integration

SQL = "SELECT age_band, COUNT(*) AS adults FROM copd GROUP BY age_band"
KEYS = ("region", "age_band", "measure")
FIGURES = ("estimate", "std_error", "ci_low", "ci_high", "suppressed", "partial")


@pytest.fixture
def no_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No running demo's state, and no CHC_HUB / CHC_IDENTITY, whatever the machine has."""
    monkeypatch.setattr(demo, "DEMO_STATE", tmp_path / "no-demo.json")
    monkeypatch.delenv("CHC_HUB", raising=False)
    monkeypatch.delenv("CHC_IDENTITY", raising=False)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


@pytest.mark.usefixtures("no_demo")
def test_frames_agree_with_the_result_table(federation: LocalFederation) -> None:
    with Federation.connect(federation.hub_address, federation.analyst_identity) as fed:
        result = fed.query(parse_sql(SQL, rho=0.05))
    table = result.table.to_pylist()
    arrow = result.to_arrow()
    frames = {
        "arrow": arrow.to_pylist(),
        "pandas": result.to_pandas().to_dict("records"),
        "polars": result.to_polars().to_dicts(),
    }
    assert list(result.to_pandas().columns) == arrow.column_names
    assert list(result.to_polars().columns) == arrow.column_names
    for name, rows in frames.items():
        assert len(rows) == len(table), name
        for got, want in zip(rows, table, strict=True):
            for k in (*KEYS, *FIGURES):
                expected = want[k]
                if name == "pandas" and expected is None and k not in KEYS:
                    expected = float("nan") if k not in ("suppressed", "partial") else False
                if k in ("suppressed", "partial"):
                    expected = bool(expected)
                assert _same(got[k], expected), (name, k, got[k], want[k])
            pooled = got["region"] == POOLED
            assert got["node_status"] == "ok"
            charged = {o.node: o.rho_charged for o in result.nodes}
            want_rho = math.fsum(charged.values()) if pooled else charged[got["region"]]
            assert got["rho_spent"] == pytest.approx(want_rho)
    # Every node charged the query's rho: the pooled rows say what the query spent in all.
    assert all(o.rho_charged == pytest.approx(0.05) for o in result.nodes)
    html = result._repr_html_()
    assert f"{len(result.nodes)} / {len(result.nodes)} nodes ok" in html
    assert len(re.findall(r'<g class="panel( pooled)?"', html)) == len(result.nodes) + 1


@pytest.mark.usefixtures("no_demo")
def test_explain_is_a_sequence_with_frames_and_a_view(
    federation: LocalFederation, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHC_HUB", federation.hub_address)
    monkeypatch.setenv("CHC_IDENTITY", str(federation.analyst_identity))
    with Federation.connect() as fed:
        explanation = fed.explain(parse_sql(SQL, rho=0.05))
    assert isinstance(explanation, Explanation)
    assert len(explanation) == 4
    assert all(e.status is NodeStatus.OK for e in explanation)
    rows = explanation.to_arrow().to_pylist()
    assert {r["node"] for r in rows} == {e.node for e in explanation}
    for r in rows:
        # One count measure: all the query's rho, with Gaussian noise of sd 1/sqrt(2 rho).
        assert r["measure_rho"] == pytest.approx(0.05, rel=1e-6)
        assert r["noise_sd"] == pytest.approx(1 / math.sqrt(2 * 0.05), rel=1e-6)
    assert list(explanation.to_pandas().columns) == explanation.to_arrow().column_names
    html = explanation._repr_html_()
    assert "4 / 4 nodes can run it" in html
    assert all(f'data-node="{e.node}"' in html for e in explanation)


@pytest.mark.usefixtures("no_demo")
def test_connect_without_a_hub_says_what_to_pass() -> None:
    with pytest.raises(ConfigError) as info:
        Federation.connect()
    message = str(info.value)
    for hint in ('hub="HOST:PORT"', "CHC_HUB", 'identity="DIR"', "CHC_IDENTITY", "chc demo"):
        assert hint in message


@pytest.mark.usefixtures("no_demo")
def test_connect_reads_the_running_demos_state(
    federation: LocalFederation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "demo.json"
    monkeypatch.setattr(demo, "DEMO_STATE", state)
    state.write_text(
        f'{{"hub": "{federation.hub_address}", "identity": "{federation.analyst_identity}"}}'
    )
    with Federation.connect() as fed:
        assert fed.hub == federation.hub_address
        found, _ = fed.nodes()
    assert len(found) == 4
    # The demo's hub is gone: the error says where the address came from and what to check.
    state.write_text(f'{{"hub": "127.0.0.1:1", "identity": "{federation.analyst_identity}"}}')
    with Federation.connect() as fed, pytest.raises(HubUnavailableError) as info:
        fed.nodes(timeout_s=2)
    assert str(state) in str(info.value)
    assert "chc demo --keep-running" in str(info.value)
