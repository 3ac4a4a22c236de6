"""Care sites: a node built from a synthetic region publishes `care_site` only if declared.

Real OmopStore (DuckDB) over a generated region; every count by care site is checked against
DuckDB on the raw Parquet files.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import duckdb
import pytest

from coordinator.local import synth
from node.config import load_config
from node.data.care_sites import refuse_undeclared
from node.data.catalog import visit_years
from node.data.findings import Level
from node.data.store import OmopStore
from queries import plan
from queries.errors import ConfigError, QueryError
from queries.pathway import load_pathways
from queries.spec import Filter, Query
from tests.unit._synth_helpers import REF, SEED

PERSONS = 20_000
DECLARED = ("RXN", "RXL", "RTD")  # two of nwc's trusts and one of another region


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("nwc")
    nwc = synth.region_by_slug("nwc")
    synth.generate_region(
        nwc, PERSONS, folder, seed=synth.region_seed(SEED, nwc), reference_date=REF
    )
    return folder


def _store(folder: Path, care_sites: tuple[str, ...] = ()) -> OmopStore:
    return OmopStore(
        folder,
        load_pathways(["copd"]),
        reference_date=REF,
        imd_lookup=folder / synth.LOOKUP_FILE,
        recheck_s=None,
        care_sites=care_sites,
    )


@pytest.fixture(scope="module")
def declared(region: Path) -> Iterator[OmopStore]:
    store = _store(region, DECLARED)
    yield store
    store.close()


def _counts(store: OmopStore, view: str) -> dict[str, int]:
    rows = store.query(f"SELECT care_site, count(*) AS n FROM {view} GROUP BY 1").to_pylist()  # noqa: S608
    return {r["care_site"]: r["n"] for r in rows}


def _site(column: str, domain_extra: str) -> str:
    """SQL mapping a care_site_id column onto the declared code, 'other' or domain_extra."""
    listed = ", ".join(f"'{c}'" for c in DECLARED)
    return (
        f"CASE WHEN {column} IS NULL THEN '{domain_extra}' "
        f"WHEN cs.care_site_source_value IN ({listed}) THEN cs.care_site_source_value "
        "ELSE 'other' END"
    )


def test_without_the_declaration_no_view_has_the_column(region: Path) -> None:
    store = _store(region)
    try:
        catalog = store.catalog()
        for view in catalog.views:
            assert "care_site" not in [c.name for c in view.columns], view.name
        for table in ("visits", "copd"):
            described = store.query("DESCRIBE " + table)["column_name"].to_pylist()
            assert "care_site" not in described
        # The source has care sites: nothing about them is a warning on this node.
        assert not [f for f in store.report.warnings if "care_site" in f.where]
        query = Query(view="copd", rho=0.1, group_by=("care_site",))
        with pytest.raises(QueryError, match="has not declared care sites"):
            refuse_undeclared(query, ())
        with pytest.raises(QueryError, match="has no column 'care_site'"):
            plan.compile_query(query, catalog)  # what the node's refusal comes before
        where = Query(view="visits", rho=0.1, where=(Filter("care_site", ("RXN",)),))
        with pytest.raises(QueryError, match=r"\[care_sites\] publish"):
            refuse_undeclared(where, ())
        refuse_undeclared(Query(view="copd", rho=0.1, group_by=("sex",)), ())
    finally:
        store.close()


def test_the_declared_domains_are_public(declared: OmopStore) -> None:
    catalog = declared.catalog()
    assert catalog.view("visits").column("care_site").domain == (*DECLARED, "other")
    assert catalog.view("visits").column("care_site").person_level is False
    copd = catalog.view("copd").column("care_site")
    assert copd.domain == (*DECLARED, "other", "none")
    assert copd.person_level
    query = Query(view="copd", rho=0.1, group_by=("care_site",))
    refuse_undeclared(query, DECLARED)
    compiled = plan.compile_query(query, catalog)
    assert [g[0] for g in compiled.domain] == [*DECLARED, "other", "none"]


def test_visit_counts_by_care_site_equal_duckdb_on_the_raw_tables(
    declared: OmopStore, region: Path
) -> None:
    first_year = visit_years(REF)[0]
    con = duckdb.connect()
    raw = con.execute(
        f"""
        WITH kept AS (
            SELECT * FROM read_parquet(?)
            WHERE visit_start_date BETWEEN ? AND ?
            -- The view's cap (docs/data.md): 50 a person, in the order of the id's MD5.
            QUALIFY row_number() OVER (
                PARTITION BY person_id
                ORDER BY md5(CAST(visit_occurrence_id AS VARCHAR)), visit_occurrence_id
            ) <= 50
        )
        SELECT {_site("v.care_site_id", "other")} AS site, count(*) AS n
        FROM kept AS v LEFT JOIN read_parquet(?) AS cs USING (care_site_id) GROUP BY 1
        """,  # noqa: S608 - constants
        [
            str(region / "visit_occurrence.parquet"),
            date(int(first_year), 1, 1),
            REF,
            str(region / "care_site.parquet"),
        ],
    ).fetchall()
    assert dict(raw) == _counts(declared, "visits")
    assert set(dict(raw)) == {*DECLARED, "other"}


def test_pathway_counts_by_care_site_equal_duckdb_on_the_raw_tables(
    declared: OmopStore, region: Path
) -> None:
    """Person-level: every synthetic person has person.care_site_id (their home trust)."""
    members = declared.query("SELECT person_id FROM copd")
    con = duckdb.connect()
    con.register("members", members)
    raw = con.execute(
        f"""
        SELECT {_site("p.care_site_id", "none")} AS site, count(*) AS n
        FROM members AS m JOIN read_parquet(?) AS p USING (person_id)
        LEFT JOIN read_parquet(?) AS cs USING (care_site_id) GROUP BY 1
        """,  # noqa: S608 - constants
        [str(region / "person.parquet"), str(region / "care_site.parquet")],
    ).fetchall()
    counts = _counts(declared, "copd")
    assert dict(raw) == counts
    # RTD is a North East trust: no North West Coast person has it as home trust.
    assert set(counts) == {"RXN", "RXL", "other"}


def test_without_person_care_sites_the_usual_site_comes_from_the_visits(
    region: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "omop"
    shutil.copytree(region, folder)
    con = duckdb.connect()
    # The person file without care_site_id (as many exports are).
    con.read_parquet(str(region / "person.parquet")).select(
        "* EXCLUDE (care_site_id)"
    ).write_parquet(str(folder / "person.parquet"))
    store = _store(folder, DECLARED)
    try:
        members = store.query("SELECT person_id, care_site FROM copd")
        assert "person.care_site_id" in [f.where for f in store.report.findings]
        con.register("members", members)
        listed = ", ".join(f"'{c}'" for c in DECLARED)
        # Most visits (any type) up to the reference date; ties to the site visited first.
        raw = con.execute(
            f"""
            WITH v AS (
                SELECT v.person_id,
                       CASE WHEN cs.care_site_source_value IN ({listed})
                            THEN cs.care_site_source_value ELSE 'other' END AS site,
                       count(*) AS n, min(v.visit_start_date) AS first
                FROM read_parquet(?) AS v JOIN read_parquet(?) AS cs USING (care_site_id)
                WHERE v.visit_start_date <= ? GROUP BY 1, 2
            ),
            u AS (
                SELECT person_id, site FROM v
                QUALIFY row_number() OVER (PARTITION BY person_id ORDER BY n DESC, first) = 1
            )
            SELECT m.person_id, coalesce(u.site, 'none') AS site
            FROM members AS m LEFT JOIN u USING (person_id)
            """,  # noqa: S608 - constants
            [str(folder / "visit_occurrence.parquet"), str(folder / "care_site.parquet"), REF],
        ).fetchall()
        got = dict(
            zip(members["person_id"].to_pylist(), members["care_site"].to_pylist(), strict=True)
        )
        assert dict(raw) == got
        assert {"RXN", "RXL", "other"} <= set(got.values())
    finally:
        store.close()


def test_a_missing_care_site_table_is_a_warning_only_when_declared(
    region: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "omop"
    shutil.copytree(region, folder)
    (folder / "care_site.parquet").unlink()
    store = _store(folder)
    try:
        assert not [f for f in store.report.warnings if f.where.startswith("care_site")]
        assert [f.level for f in store.report.findings if f.where == "care_site"] == [Level.NOTE]
    finally:
        store.close()
    store = _store(folder, DECLARED)
    try:
        (warning,) = [f for f in store.report.warnings if f.where == "care_site"]
        assert "no usable care_site table" in warning.message
        assert _counts(store, "visits").keys() == {"other"}
        assert _counts(store, "copd").keys() == {"none"}
    finally:
        store.close()


def test_a_declared_code_missing_from_the_table_is_a_warning(region: Path) -> None:
    store = _store(region, ("RXN", "ZZZ99"))
    try:
        (warning,) = [f for f in store.report.warnings if f.where.startswith("care_site")]
        assert "['ZZZ99']" in warning.message
        assert _counts(store, "visits").get("ZZZ99") is None  # zero rows: absent in GROUP BY
    finally:
        store.close()


def _toml(tmp_path: Path, table: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'name = "nwc"\nomop = "o"\nidentity = "i"\n{table}\n', encoding="utf-8")
    return path


def test_node_toml_declares_care_sites(tmp_path: Path) -> None:
    assert load_config(_toml(tmp_path, "")).care_sites == ()
    cfg = load_config(_toml(tmp_path, '[care_sites]\npublish = ["rtd", " RXN "]'))
    assert cfg.care_sites == ("RTD", "RXN")
    for bad, match in (
        ('[care_sites]\npublish = ["R-1"]', "not an ODS code"),
        ('[care_sites]\npublish = ["RTD", "rtd"]', "twice"),
        ('[care_sites]\npublish = "RTD"', "must be a list"),
        ('[care_sites]\nsites = ["RTD"]', "unknown \\[care_sites\\] key"),
        ('care_sites = ["RTD"]', "must be a table"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(_toml(tmp_path, bad))


def test_the_synthetic_care_sites(region: Path) -> None:
    """Home trusts in the region; visits mostly at the home trust (docs/synthetic-data.md)."""
    con = duckdb.connect()
    sites = con.execute(
        "SELECT care_site_id, care_site_source_value FROM read_parquet(?)",
        [str(region / "care_site.parquet")],
    ).fetchall()
    assert [code for _, code in sites] == [t.code for t in synth.TRUSTS]
    assert len({code for _, code in sites}) == len(sites) == 24
    assert all(synth.care_site_id(code) == i for i, code in sites)
    nwc = {synth.care_site_id(t.code) for t in synth.region_trusts("nwc")}
    assert synth.WORSE_TRUST in {t.code for t in synth.region_trusts("nwc")}
    person, visit = str(region / "person.parquet"), str(region / "visit_occurrence.parquet")
    homes = {
        r[0]
        for r in con.execute(
            "SELECT DISTINCT care_site_id FROM read_parquet(?)", [person]
        ).fetchall()
    }
    assert homes == nwc
    home, local, n = con.execute(
        """
        SELECT avg((v.care_site_id = p.care_site_id)::INT),
               avg(list_contains(?, v.care_site_id)::INT), count(*)
        FROM read_parquet(?) AS v JOIN read_parquet(?) AS p USING (person_id)
        """,
        [sorted(nwc), visit, person],
    ).fetchone() or (0.0, 0.0, 0)
    # Expected 0.90 + 0.07 / 5 and 0.97 + 0.03 * 5 / 19; a person's visits are drawn
    # independently given the home trust, so 0.02 is over 10 standard errors at ~90,000.
    assert n > 50_000
    assert abs(home - (0.90 + 0.07 / 5)) < 0.02
    assert abs(local - (0.97 + 0.03 * 5 / 19)) < 0.02
