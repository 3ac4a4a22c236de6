"""Results and explanations as Arrow, pandas and polars frames (queries/present/frames.py)."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest

from queries.combine import POOLED
from queries.errors import ChcError
from queries.present.frames import MissingExtraError
from queries.results import (
    BudgetStatus,
    Explanation,
    MeasureNoise,
    NodeExplain,
    NodeOutcome,
    NodeStatus,
    NoiseInfo,
)
from tests.unit._present_helpers import RHO, federated

FRAME_TAIL = ["suppressed", "node_status", "rho_spent"]


def test_the_frame_has_the_table_then_flags_status_and_spend() -> None:
    result = federated({"leeds": [100, 40], "york": [60, 30]})
    frame = result.to_arrow()
    table = result.table
    assert frame.column_names[: table.num_columns] == [
        c for c in table.column_names if c not in ("partial", "suppressed")
    ] + ["partial", "suppressed"]
    assert frame.column_names[-3:] == FRAME_TAIL
    for name in ("region", "sex", "measure", "estimate", "std_error", "ci_low", "ci_high"):
        assert frame.column(name).to_pylist() == table.column(name).to_pylist()
    rows = frame.to_pylist()
    assert [r["node_status"] for r in rows] == ["ok"] * 6
    assert [r["rho_spent"] for r in rows] == [RHO] * 4 + [pytest.approx(2 * RHO)] * 2
    assert not any(r["partial"] or r["suppressed"] for r in rows)
    assert rows[-1]["region"] == POOLED


def test_suppressed_cells_are_flagged_from_the_release_rules() -> None:
    # 3 is below the rules' 8: suppressed, with the complementary cells the rules choose (read
    # back from the table, not re-derived here).
    result = federated({"leeds": [100, 3], "york": [60, 30]})
    rows = result.to_arrow().to_pylist()
    expected = result.table.column("suppressed").to_pylist()
    assert [r["suppressed"] for r in rows] == expected
    assert any(expected)
    for r in rows:
        assert (r["estimate"] is None) == r["suppressed"]


def test_a_partial_result_flags_every_row_and_the_pooled_status() -> None:
    result = federated({"leeds": [100, 40], "york": [60, 30]}, missing={"hull": "unreachable"})
    rows = result.to_arrow().to_pylist()
    assert all(r["partial"] for r in rows)
    assert [r["node_status"] for r in rows if r["region"] == POOLED] == ["partial", "partial"]
    assert {r["node_status"] for r in rows if r["region"] != POOLED} == {"ok"}
    # The pooled row's spend is what the answering nodes charged.
    assert [r["rho_spent"] for r in rows if r["region"] == POOLED] == [pytest.approx(2 * RHO)] * 2


def test_a_node_whose_charge_is_unknown_leaves_the_pooled_spend_unknown() -> None:
    # A node that timed out may have charged (the hub could not tell): the pooled row's
    # spend is then null, never the known part passed off as the whole.
    result = federated({"leeds": [100, 40], "york": [60, 30]}, missing={"hull": "timed out"})
    hull = NodeOutcome(node="hull", status=NodeStatus.TIMED_OUT, charge_unknown=True)
    result = dataclasses.replace(result, nodes=(*result.nodes[:2], hull))
    rows = result.to_arrow().to_pylist()
    assert [r["rho_spent"] for r in rows if r["region"] == POOLED] == [None, None]
    assert {r["rho_spent"] for r in rows if r["region"] != POOLED} == {RHO}
    assert "hull: charge unknown" in result._repr_html_()


def test_pandas_and_polars_frames_agree_with_arrow() -> None:
    result = federated({"leeds": [100, 3], "york": [60, 30]})
    arrow = result.to_arrow()
    pandas = result.to_pandas()
    polars = result.to_polars()
    assert list(pandas.columns) == arrow.column_names == list(polars.columns)
    assert pandas["region"].tolist() == arrow.column("region").to_pylist()
    assert polars["suppressed"].to_list() == arrow.column("suppressed").to_pylist()
    for got, want in zip(
        pandas["estimate"].tolist(), arrow.column("estimate").to_pylist(), strict=True
    ):
        assert (want is None and math.isnan(got)) or got == want
    assert polars["estimate"].to_list() == arrow.column("estimate").to_pylist()


def test_a_missing_library_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    result = federated({"leeds": [100, 40]})
    monkeypatch.setitem(sys.modules, "polars", None)  # import polars now raises ImportError
    with pytest.raises(MissingExtraError, match=r'pip install "chc\[notebook\]"') as info:
        result.to_polars()
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value, ChcError)


def _explanation() -> Explanation:
    budget = BudgetStatus(rho_total=1.0, rho_spent=0.25, max_rho_per_query=0.5, delta=1e-6)
    noise = NoiseInfo("discrete_gaussian", 2.0, 4.0, 1.0)
    return Explanation(
        (
            NodeExplain(
                node="leeds",
                status=NodeStatus.OK,
                plan="SELECT ...",
                measures=(
                    MeasureNoise("persons", "count", noise, 0.05),
                    MeasureNoise("rows", "count_rows", NoiseInfo("gaussian", 3, 9.0, 1.0), 0.05),
                ),
                rho=0.1,
                epsilon=1.2,
                cells=3,
                budget=budget,
            ),
            NodeExplain(node="york", status=NodeStatus.REFUSED, message="no view <copd>"),
        )
    )


def test_an_explanation_is_still_a_sequence_of_node_explains() -> None:
    explanation = _explanation()
    assert len(explanation) == 2
    assert explanation[0].node == "leeds"
    assert explanation[-1].status is NodeStatus.REFUSED
    assert [e.node for e in explanation] == ["leeds", "york"]
    assert [e.node for e in explanation[:1]] == ["leeds"]
    assert {e.node: e for e in explanation}["york"].message == "no view <copd>"
    assert explanation[1] in explanation


def test_an_explanation_frame_has_a_row_per_node_and_measure() -> None:
    rows = _explanation().to_arrow().to_pylist()
    assert [(r["node"], r["measure"]) for r in rows] == [
        ("leeds", "persons"),
        ("leeds", "rows"),
        ("york", None),
    ]
    assert [r["noise_sd"] for r in rows] == [2.0, 3.0, None]
    assert rows[0]["rho_remaining"] == pytest.approx(0.75)
    assert rows[2]["status"] == "refused"
    assert rows[2]["message"] == "no view <copd>"
    assert list(_explanation().to_pandas().columns) == _explanation().to_arrow().column_names
