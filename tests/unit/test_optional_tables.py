"""Optional OMOP tables that are absent, empty or unusable: a warning, never a refusal.

Real exports often carry a death or location table without its header row (DuckDB then names
the columns column0, column1, ...). The node must serve the rest exactly as it does without
that table, and say in a WARNING which columns it found and what becomes unavailable. A
missing required table is still refused, by name. Each case runs in every input format.
"""

from __future__ import annotations

import csv
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from node.cli import app
from node.data.findings import Level, ValidationReport
from node.data.store import OmopStore
from protocols.security.pki import Role, create_ca, issue
from queries.errors import DataError
from queries.pathway import load_pathways
from tests.unit.omop_testdata import REF, Omop, example, write, write_lookup

PATHWAYS = load_pathways(None)
FORMATS = ("parquet", "csv", "duckdb")


def without(omop: Omop, table: str) -> Omop:
    """A copy of the dataset with no such table at all."""
    out = omop.copy()
    out.tables.pop(table, None)
    return out


def headerless(source: Path, fmt: str, table: str, rows: list[tuple[Any, ...]]) -> None:
    """Add `table` to a written source the way a header-less export arrives."""
    if fmt == "csv":
        with (source / f"{table}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(rows)  # no header row: DuckDB names them column0, ...
        return
    columns = {
        f"column{i}": pa.array([r[i] for r in rows]) for i in range(len(rows[0]))
    }  # what DuckDB writes when it read such a file with the header detected as absent
    arrow = pa.table(columns)
    if fmt == "parquet":
        pq.write_table(arrow, source / f"{table}.parquet")
        return
    con = duckdb.connect(str(source))
    try:
        con.register("t", arrow)
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM t")  # noqa: S608 - constant
    finally:
        con.close()


def write_without(omop: Omop, path: Path, fmt: str, table: str) -> Path:
    target = path.with_suffix(".duckdb") if fmt == "duckdb" else path
    return write(without(omop, table), target, fmt)


def issue_node(tmp_path: Path, node_dir: Path) -> None:
    """A CA and a node certificate for "yh" in node_dir/identity, as `chc-node check` needs."""
    pki = tmp_path / "pki"
    create_ca(pki)
    issue(pki, role=Role.NODE, name="yh", out_dir=node_dir / "identity")


def snapshot(store: OmopStore) -> dict[str, Counter[tuple[Any, ...]]]:
    return {
        name: Counter(tuple(r.items()) for r in store.query(f'SELECT * FROM "{name}"').to_pylist())  # noqa: S608
        for name in store.tables()
    }


def warning_at(report: ValidationReport, where: str) -> str:
    matches = [f.message for f in report.findings if f.level is Level.WARNING and f.where == where]
    assert matches, f"no warning at {where}:\n{report.render()}"
    return matches[0]


DEATHS = [(2, date(2025, 6, 1)), (3, date(2023, 1, 1))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_headerless_death_table_serves_the_rest_with_a_warning(fmt: str, tmp_path: Path) -> None:
    source = write_without(example(), tmp_path / "bad", fmt, "death")
    headerless(source, fmt, "death", DEATHS)
    store = OmopStore(source, PATHWAYS, reference_date=REF, threads=1)
    absent = OmopStore(
        write_without(example(), tmp_path / "absent", fmt, "death"),
        PATHWAYS,
        reference_date=REF,
        threads=1,
    )
    try:
        assert store.report.ok
        message = warning_at(store.report, "death")
        assert "columns column0, column1 found, expected person_id, death_date" in message
        assert "mortality outcomes (deceased, died_in_window) are unavailable" in message
        # Exactly what the node serves without a death table: no mortality columns at all.
        assert snapshot(store) == snapshot(absent)
        persons = store.catalog().view("persons")
        assert "deceased" not in [c.name for c in persons.columns]
        assert "died_in_window" not in [c.name for c in store.catalog().view("copd").columns]
        assert "deceased" not in store.query("SELECT * FROM persons LIMIT 1").column_names
        # Person 2 died in 2025 but, without usable deaths, stays in the COPD cohort.
        assert store.query("SELECT count(*) AS n FROM copd").to_pylist() == [{"n": 2}]
    finally:
        store.close()
        absent.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_headerless_location_table_means_imd_unknown(fmt: str, tmp_path: Path) -> None:
    lookup = write_lookup(tmp_path / "imd.csv")
    source = write_without(example(), tmp_path / "bad", fmt, "location")
    headerless(source, fmt, "location", [(100, "E01000001"), (101, "E01000002")])
    store = OmopStore(source, PATHWAYS, reference_date=REF, threads=1, imd_lookup=lookup)
    absent = OmopStore(
        write_without(example(), tmp_path / "absent", fmt, "location"),
        PATHWAYS,
        reference_date=REF,
        threads=1,
        imd_lookup=lookup,
    )
    try:
        message = warning_at(store.report, "location")
        assert "columns column0, column1 found, expected location_id" in message
        assert "imd_quintile is 'unknown' for everyone" in message
        assert snapshot(store) == snapshot(absent)
        imd = store.query("SELECT DISTINCT CAST(imd_quintile AS VARCHAR) AS q FROM persons")
        assert imd.to_pylist() == [{"q": "unknown"}]
        # The mortality columns are still there: only the location table was unusable.
        assert "deceased" in store.query("SELECT * FROM persons LIMIT 1").column_names
    finally:
        store.close()
        absent.close()


def test_an_empty_optional_file_is_a_warning(tmp_path: Path) -> None:
    source = write_without(example(), tmp_path / "omop", "csv", "death")
    (source / "death.csv").write_bytes(b"")  # zero bytes: no header, no rows
    store = OmopStore(source, PATHWAYS, reference_date=REF, threads=1)
    try:
        assert "mortality outcomes" in warning_at(store.report, "death")
        assert "deceased" not in store.query("SELECT * FROM persons LIMIT 1").column_names
    finally:
        store.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_death_table_with_a_header_but_no_rows_is_unavailable(fmt: str, tmp_path: Path) -> None:
    # Hospital-only CDMs often ship death empty: 'no' for everyone would be a wrong answer.
    omop = example()
    omop.tables["death"] = []
    target = tmp_path / ("omop.duckdb" if fmt == "duckdb" else "omop")
    store = OmopStore(write(omop, target, fmt), PATHWAYS, reference_date=REF, threads=1)
    try:
        assert "no rows" in warning_at(store.report, "death")
        assert "deceased" not in [c.name for c in store.catalog().view("persons").columns]
    finally:
        store.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_missing_required_table_is_still_refused_by_name(fmt: str, tmp_path: Path) -> None:
    source = write_without(example(), tmp_path / "omop", fmt, "visit_occurrence")
    with pytest.raises(DataError, match="ERROR   visit_occurrence: required table missing"):
        OmopStore(source, PATHWAYS, reference_date=REF, threads=1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_headerless_required_table_is_refused_naming_its_columns(
    fmt: str, tmp_path: Path
) -> None:
    omop = example()
    rows = [tuple(r.values()) for r in omop.rows("condition_occurrence")]
    source = write_without(omop, tmp_path / "omop", fmt, "condition_occurrence")
    headerless(source, fmt, "condition_occurrence", rows)
    with pytest.raises(DataError) as refused:
        OmopStore(source, PATHWAYS, reference_date=REF, threads=1)
    assert "condition_occurrence.person_id: required column missing" in str(refused.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_init_and_check_serve_a_headerless_death_table(fmt: str, tmp_path: Path) -> None:
    source = write_without(example(), tmp_path / "omop", fmt, "death")
    headerless(source, fmt, "death", DEATHS)
    runner = CliRunner()
    config = tmp_path / "n" / "node.toml"
    done = runner.invoke(app, ["init", str(config.parent), "--name", "yh", "--omop", str(source)])
    assert done.exit_code == 0, done.output
    line = "WARNING death: columns column0, column1 found, expected person_id, death_date"
    assert line in done.output
    issue_node(tmp_path, config.parent)
    checked = runner.invoke(app, ["check", "--config", str(config)])
    assert checked.exit_code == 0, checked.output
    assert line in checked.output
    assert "view persons: ok" in checked.output


def test_check_still_refuses_a_missing_required_table_by_name(tmp_path: Path) -> None:
    source = write_without(example(), tmp_path / "omop", "parquet", "death")
    headerless(source, "parquet", "death", DEATHS)
    config = tmp_path / "n" / "node.toml"
    done = CliRunner().invoke(
        app, ["init", str(config.parent), "--name", "yh", "--omop", str(source)]
    )
    assert done.exit_code == 0, done.output
    issue_node(tmp_path, config.parent)
    (source / "person.parquet").unlink()
    refused = CliRunner().invoke(app, ["check", "--config", str(config)])
    assert refused.exit_code != 0
    assert "ERROR   person: required table missing" in refused.output
