"""A running store re-reads its consent registers when they change (node.data.store.OmopStore).

Real files under a real store: a register is rewritten, the store notices, rebuilds its views
in a DuckDB of their own while the old views keep answering, and switches to them; an opted-
out person's rows then leave every exact aggregate. A register that becomes invalid refuses
every query (FAILED_PRECONDITION) until it is fixed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coordinator.local import synth
from node import engine
from node.data.catalog import build_catalog
from node.data.consent import ConsentPolicy
from node.data.store import OmopStore
from queries import plan
from queries.errors import DataError
from queries.pathway import load_pathways
from queries.spec import Measure, Query, Statistic
from tests.unit.omop_testdata import REF, example, write

PATHWAYS = load_pathways(None)
CATALOG = build_catalog(PATHWAYS, reference_date=REF)
# Exact aggregates over persons and visits, the way the engine computes them for a release.
PERSONS_BY_SEX = plan.compile_query(Query(view="persons", rho=1.0, group_by=("sex",)), CATALOG)
VISIT_ROWS = plan.compile_query(
    Query(view="visits", rho=1.0, measures=(Measure(Statistic.COUNT_ROWS, "rows"),)), CATALOG
)


def write_register(path: Path, ids: list[Any]) -> Path:
    """Opt-outs (own, adult) for ids, replacing the file in one step as custodians should."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".parquet":
        table = pa.table({"person_id": [str(i) for i in ids], "date": ["2024-01-01"] * len(ids)})
        pq.write_table(table, tmp)
    else:
        tmp.write_text("person_id,date\n" + "".join(f"{i},2024-01-01\n" for i in ids))
    tmp.replace(path)
    return path


def persons(store: OmopStore) -> set[int]:
    return {int(r["person_id"]) for r in store.query("SELECT person_id FROM persons").to_pylist()}


def exact(store: OmopStore) -> tuple[list[int], list[int]]:
    """(persons by sex, visit rows), exact, through node.engine."""
    (by_sex,) = engine.exact_values(PERSONS_BY_SEX, store).values()
    (rows,) = engine.exact_values(VISIT_ROWS, store).values()
    return by_sex, rows


def snapshot(store: OmopStore) -> dict[str, Counter[tuple[Any, ...]]]:
    return {
        name: Counter(tuple(r.values()) for r in store.query(f'SELECT * FROM "{name}"').to_pylist())  # noqa: S608
        for name in store.tables()
    }


def open_store(source: Path, reg: Path, **options: Any) -> OmopStore:
    options.setdefault("recheck_s", None)  # the tests call reload_if_changed themselves
    return OmopStore(
        source,
        PATHWAYS,
        reference_date=REF,
        threads=2,
        consent=ConsentPolicy(registers=(reg,)),
        **options,
    )


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write(example(), tmp_path / "omop")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_an_opt_out_added_under_a_running_store_leaves_every_exact_aggregate(
    source: Path, tmp_path: Path, suffix: str
) -> None:
    reg = write_register(tmp_path / f"optouts{suffix}", [2])
    store = open_store(source, reg)
    try:
        assert 5 in persons(store)
        assert 2 not in persons(store)
        (female, male, unknown), before = exact(store)
        # Person 5 (female, 50 visits in the visits view) opts out; person 2 opts back in
        # (their opt-out is removed from the register).
        write_register(reg, [5])
        assert store.reload_if_changed()
        assert store.generation == 2
        assert 5 not in persons(store)
        assert 2 in persons(store)
        assert exact(store) == ([female - 1, male + 1, unknown], [before[0] - 50 + 1])
        fresh = open_store(source, reg)
        try:
            assert snapshot(store) == snapshot(fresh)  # as if the node had been restarted
        finally:
            fresh.close()
        assert not store.reload_if_changed()  # nothing changed since
    finally:
        store.close()


def test_a_register_touched_or_copied_over_unchanged_is_not_rebuilt(
    source: Path, tmp_path: Path
) -> None:
    reg = write_register(tmp_path / "optouts.csv", [2])
    store = open_store(source, reg)
    try:
        later = time.time_ns() + 5_000_000_000
        os.utime(reg, ns=(later, later))
        assert not store.reload_if_changed()
        write_register(reg, [2])  # the same content in a new file (a new inode)
        assert not store.reload_if_changed()
        assert store.generation == 1
    finally:
        store.close()


def test_a_rewrite_keeping_size_and_mtime_is_still_seen(source: Path, tmp_path: Path) -> None:
    reg = write_register(tmp_path / "optouts.csv", [2])
    store = open_store(source, reg)
    try:
        before = reg.stat()
        with reg.open("r+") as f:  # in place: the same inode and size
            f.write("person_id,date\n5,2024-01-01\n")
        os.utime(reg, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert reg.stat().st_size == before.st_size
        assert store.reload_if_changed()
        assert 5 not in persons(store)
        assert 2 in persons(store)
    finally:
        store.close()


def test_an_invalid_register_refuses_every_query_until_it_is_fixed(
    source: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reg = write_register(tmp_path / "optouts.csv", [2])
    store = open_store(source, reg)
    try:
        with caplog.at_level(logging.ERROR, logger="node.data.store"):
            write_register(reg, [5, "77.5"])
            assert store.reload_if_changed()
        for attempt in (lambda: exact(store), lambda: store.query("SELECT 1 AS x")):
            with pytest.raises(DataError) as refused:
                attempt()
            assert refused.value.status_name == "FAILED_PRECONDITION"
            message = str(refused.value)
            assert (
                f"consent register {reg} is invalid: person_id is missing or not a whole number"
                in message
            )
            assert "77.5" not in message  # rows are for the log only
            assert "line" not in message
            assert "opted out" in message
        # The custodian's log has the file, the problem, the line and the value.
        logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert "REFUSING ALL QUERIES" in logged
        assert f"consent register {reg} [1]" in logged
        assert "line 3 ('77.5')" in logged
        assert store.refusal is not None
        # Unchanged, it stays refused; fixed, the new decisions are served.
        assert not store.reload_if_changed()
        with pytest.raises(DataError):
            store.query("SELECT 1 AS x")
        write_register(reg, [5])
        assert store.reload_if_changed()
        assert store.refusal is None
        assert 5 not in persons(store)
        assert 2 in persons(store)
    finally:
        store.close()


def test_a_register_that_disappears_refuses_queries(source: Path, tmp_path: Path) -> None:
    reg = write_register(tmp_path / "optouts.csv", [2])
    store = open_store(source, reg)
    try:
        reg.unlink()
        assert store.reload_if_changed()
        with pytest.raises(DataError, match="the file does not exist"):
            store.query("SELECT 1 AS x")
        write_register(reg, [2])
        assert store.reload_if_changed()
        assert 2 not in persons(store)
    finally:
        store.close()


def test_a_rebuild_that_cannot_read_the_source_refuses_queries(
    source: Path, tmp_path: Path
) -> None:
    reg = write_register(tmp_path / "optouts.csv", [2])
    store = open_store(source, reg)
    moved = source.with_name("elsewhere")
    try:
        source.rename(moved)
        write_register(reg, [5])
        assert store.reload_if_changed()
        with pytest.raises(DataError, match="could not be rebuilt from the node's OMOP data"):
            store.query("SELECT 1 AS x")
        moved.rename(source)
        write_register(reg, [5, 2])  # any change of a register tries again
        assert store.reload_if_changed()
        assert {2, 5}.isdisjoint(persons(store))
    finally:
        store.close()


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("region") / "nwc"
    synth.generate_region(synth.region_by_slug("nwc"), 20_000, folder, seed=5)
    return folder


def test_queries_are_answered_from_the_old_views_while_the_new_ones_build(
    region: Path, tmp_path: Path
) -> None:
    reg = write_register(tmp_path / "optouts.csv", [])
    store = open_store(region, reg)
    try:
        count = "SELECT count(*) AS n FROM persons"
        everyone = store.query(count).to_pylist()[0]["n"]
        first = [
            r["person_id"]
            for r in store.query(
                "SELECT person_id FROM persons WHERE age >= 18 LIMIT 3"
            ).to_pylist()
        ]
        write_register(reg, first)
        rebuild = threading.Thread(target=store.reload_if_changed)
        rebuild.start()
        during: list[int] = []
        while rebuild.is_alive():
            building = store.rebuilding
            n = store.query(count).to_pylist()[0]["n"]
            if building and store.rebuilding:  # the whole query ran during the rebuild
                during.append(n)
        rebuild.join()
        assert during, "no query ran while the views were being rebuilt"
        assert set(during) == {everyone}
        assert store.query(count).to_pylist()[0]["n"] == everyone - 3
    finally:
        store.close()


def test_the_store_watches_its_registers_by_itself(source: Path, tmp_path: Path) -> None:
    reg = write_register(tmp_path / "optouts.csv", [2])
    store = open_store(source, reg, recheck_s=0.05)
    try:
        write_register(reg, [5])
        deadline = time.monotonic() + 30
        while store.generation == 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.generation == 2
        assert 5 not in persons(store)
        assert 2 in persons(store)
    finally:
        store.close()


def test_a_child_opted_out_by_a_parent_later_is_dropped(source: Path, tmp_path: Path) -> None:
    reg = write_register(tmp_path / "optouts.csv", [])
    store = open_store(source, reg)
    try:
        assert 1 in persons(store)  # a child with asthma
        (rows_before,) = engine.exact_values(VISIT_ROWS, store).values()
        reg.write_text("person_id,date,decided_by\n1,2025-06-01,parent\n")
        assert store.reload_if_changed()
        assert 1 not in persons(store)
        for view in ("asthma_children", "urgent_care", "visits"):
            got = store.query(f"SELECT count(*) AS n FROM {view} WHERE person_id = 1")  # noqa: S608
            assert got.to_pylist() == [{"n": 0}], view
        (rows_after,) = engine.exact_values(VISIT_ROWS, store).values()
        assert rows_after == [rows_before[0] - 6]  # person 1's six visits
    finally:
        store.close()


def test_a_closed_store_refuses_queries(source: Path, tmp_path: Path) -> None:
    reg = write_register(tmp_path / "optouts.csv", [2])
    store = open_store(source, reg, recheck_s=0.05)
    store.close()
    with pytest.raises(DataError, match="closed"):
        store.query("SELECT 1 AS x")
    write_register(reg, [5])
    time.sleep(0.2)
    assert store.generation == 1  # the watch has stopped


def test_views_read_from_a_register_that_changed_meanwhile_are_not_used(
    region: Path, tmp_path: Path
) -> None:
    reg = write_register(tmp_path / "optouts.csv", [])
    store = open_store(region, reg)
    try:
        adults = [
            int(r["person_id"])
            for r in store.query(
                "SELECT person_id FROM persons WHERE age >= 18 ORDER BY person_id LIMIT 2"
            ).to_pylist()
        ]
        write_register(reg, adults[:1])

        def rewrite_during_the_rebuild() -> None:
            deadline = time.monotonic() + 30
            while not store.rebuilding and time.monotonic() < deadline:
                time.sleep(0.001)
            write_register(reg, adults)

        writer = threading.Thread(target=rewrite_during_the_rebuild)
        writer.start()
        assert store.reload_if_changed()
        writer.join()
        # What was read may be half a file: the old views stay, and the next check rebuilds.
        assert store.generation == 1
        assert set(adults) <= persons(store)
        assert store.reload_if_changed()
        assert store.generation == 2
        assert set(adults).isdisjoint(persons(store))
    finally:
        store.close()


def test_rebuilt_views_are_sealed_like_the_first(source: Path, tmp_path: Path) -> None:
    reg = write_register(tmp_path / "optouts.csv", [2])
    store = open_store(source, reg)
    try:
        write_register(reg, [5])
        assert store.reload_if_changed()
        names = [p.name for p in PATHWAYS]
        assert set(store.tables()) == {
            "persons",
            "visits",
            *names,
            *(f"{n}_admissions" for n in names),
        }
        for sql in (
            f"SELECT * FROM read_csv('{reg}')",  # noqa: S608
            "SET enable_external_access = true",
            f"ATTACH '{tmp_path / 'other.db'}' AS other",
        ):
            with pytest.raises(duckdb.Error):
                store.query(sql)
        temporary = store.query("SELECT count(*) AS n FROM duckdb_tables() WHERE temporary")
        assert temporary.to_pylist() == [{"n": 0}]
    finally:
        store.close()
