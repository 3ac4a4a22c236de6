"""The dashboard's history: a run is kept with its result and re-opens as the same table and
chart; CSV and Parquet exports read back to the same values; errors show only their message."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from coordinator.ui.history import STATUS_ERROR, History, export_table
from queries.present.frames import result_arrow
from queries.results import FederatedResult, SecureAggregation, ShareNoise
from tests.unit._present_helpers import federated
from tests.unit._ui_helpers import browser, serving, ui_config

SQL = "SELECT sex, COUNT(*) FROM persons GROUP BY sex"
QUERY_JSON = '{"view":"persons"}'


def _result() -> FederatedResult:
    # One withheld cell (None), and a node that did not answer: flags and nulls to keep.
    return federated(
        {"north": [120.0, None], "south": [250.0, 310.0]}, missing={"east": "down for a test"}
    )


def test_a_result_is_kept_and_comes_back_the_same(tmp_path: Path) -> None:
    store = History(tmp_path / "h" / "history.sqlite")
    result = _result()
    entry_id = store.add_result(SQL, QUERY_JSON, result)
    entry = store.get(entry_id)
    assert entry is not None
    assert entry.result is not None
    assert entry.sql == SQL
    assert entry.query_json == QUERY_JSON
    assert entry.status == "partial"
    assert entry.result.table.equals(result.table)
    assert entry.result.partial
    assert entry.result.query_id == result.query_id
    assert [(o.node, o.status, o.rho_charged, o.message) for o in entry.result.nodes] == [
        (o.node, o.status, o.rho_charged, o.message) for o in result.nodes
    ]
    assert result_arrow(entry.result).equals(result_arrow(result))
    assert store.get(entry_id + 1) is None
    # Only its owner may read the analyst's results.
    assert (tmp_path / "h" / "history.sqlite").stat().st_mode & 0o077 == 0


def test_a_failed_query_is_kept_with_its_message(tmp_path: Path) -> None:
    store = History(tmp_path / "history.sqlite")
    first = store.add_result(SQL, QUERY_JSON, _result())
    failed = store.add_error(SQL, QUERY_JSON, "node north: budget exceeded")
    listed = store.entries()
    assert [e.id for e in listed] == [failed, first]  # newest first
    entry = store.get(failed)
    assert entry is not None
    assert entry.result is None
    assert entry.status == STATUS_ERROR
    assert entry.message == "node north: budget exceeded"


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_exports_read_back_to_the_same_values(tmp_path: Path) -> None:
    result = _result()
    config = ui_config(tmp_path)
    entry_id = config.history.add_result(SQL, QUERY_JSON, result)
    expected = export_table(result).to_pylist()
    with serving(config) as base, browser(base) as c:
        csv = c.get(f"/history/{entry_id}.csv")
        parquet = c.get(f"/history/{entry_id}.parquet")
    assert csv.status_code == 200
    assert parquet.status_code == 200
    assert csv.headers["content-type"].startswith("text/csv")
    assert f"chc-{entry_id}.csv" in csv.headers["content-disposition"]
    from_parquet = pq.read_table(io.BytesIO(parquet.content)).to_pylist()
    assert from_parquet == expected
    from_csv = pa_csv.read_csv(
        io.BytesIO(csv.content),
        convert_options=pa_csv.ConvertOptions(column_types=export_table(result).schema),
    ).to_pylist()
    assert len(from_csv) == len(expected)
    for got, want in zip(from_csv, expected, strict=True):
        assert got.keys() == want.keys()
        assert all(_same(got[k], want[k]) for k in want), (got, want)
    # The withheld cell is a null estimate in both, not 0.
    assert any(r["estimate"] is None and r["suppressed"] for r in from_parquet)


def test_history_pages_reopen_the_result_with_its_chart(tmp_path: Path) -> None:
    result = _result()
    config = ui_config(tmp_path)
    entry_id = config.history.add_result(SQL, QUERY_JSON, result)
    failed = config.history.add_error(SQL, QUERY_JSON, "every node refused the query")
    published = sum(e is not None for e in result.table.column("estimate").to_pylist())
    with serving(config) as base, browser(base) as c:
        listing = c.get("/history").text
        page = c.get(f"/history/{entry_id}").text
        error_page = c.get(f"/history/{failed}")
        missing = c.get("/history/999")
        no_export = c.get(f"/history/{failed}.csv")
    assert f'<tr data-entry="{entry_id}"' in listing
    assert f'href="/history/{entry_id}"' in listing
    assert f'<tr data-entry="{failed}"' in listing
    assert 'id="result-table"' in page
    assert 'class="chc-chart"' in page
    assert page.count('<rect class="bar') == published
    assert page.count("<tr data-region=") == result.table.num_rows
    assert 'id="error" role="alert"' in error_page.text
    assert "every node refused the query" in error_page.text
    assert missing.status_code == 404
    assert "does not exist" in missing.text
    assert no_export.status_code == 404
    assert "no result to export" in no_export.text


class _BrokenHistory(History):
    def entries(self, *, limit: int = 500) -> list:  # type: ignore[type-arg]
        del limit
        raise RuntimeError("secret detail /home/alice/key.pem")


def test_an_unexpected_error_shows_no_traceback(tmp_path: Path) -> None:
    config = ui_config(tmp_path, history=_BrokenHistory(tmp_path / "history.sqlite"))
    with serving(config) as base, browser(base) as c:
        response = c.get("/history")
    assert response.status_code == 500
    assert 'id="error" role="alert"' in response.text
    assert "internal error" in response.text
    assert "Traceback" not in response.text
    assert "secret detail" not in response.text
    assert "RuntimeError" not in response.text


def test_an_unusable_history_file_says_which(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(ValueError, match=r"--history .*dir\.sqlite"):
        History(tmp_path / "dir.sqlite")


def test_a_secure_aggregate_comes_back_with_its_guarantee(tmp_path: Path) -> None:
    guarantee = SecureAggregation(
        nodes=3,
        threshold=2,
        rho_threshold=0.04,
        rho_all_honest=0.0605,
        components=(
            ShareNoise(
                component="rows",
                length=2,
                upscale=10,
                share_scale=61.2,
                unit=1.0,
                rho=0.05,
                rho_threshold=0.04,
                rho_all_honest=0.0605,
            ),
        ),
        round=("east", "north", "south"),
    )
    secure = dataclasses.replace(_result(), secure_aggregation=guarantee)
    store = History(tmp_path / "history.sqlite")
    entry = store.get(store.add_result(SQL, QUERY_JSON, secure))
    plain = store.get(store.add_result(SQL, QUERY_JSON, _result()))
    assert entry is not None
    assert entry.result is not None
    assert entry.result.secure_aggregation == guarantee
    # A query's entry has no model record: the guarantee travels with its result.
    assert entry.record is None
    assert plain is not None
    assert plain.result is not None
    assert plain.result.secure_aggregation is None
