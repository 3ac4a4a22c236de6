"""Tests for what the synthetic OMOP generator writes: arguments, determinism, schemas,
chunking and the IMD lookup file."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from coordinator.local.synth.areas import LOOKUP_FILE, imd_lookup_table, write_imd_lookup
from coordinator.local.synth.generate import generate_federation, generate_region
from coordinator.local.synth.regions import (
    PERSONS_PER_LSOA,
    REGIONS,
    region_by_slug,
    region_seed,
    split_persons,
)
from tests.unit._synth_helpers import DATE, REF, TABLES, check_valid, col, days, load

I64 = pa.int64()
EXPECTED_COLUMNS: dict[str, list[tuple[str, pa.DataType]]] = {
    "person": [
        ("person_id", I64),
        ("gender_concept_id", I64),
        ("year_of_birth", I64),
        ("month_of_birth", I64),
        ("day_of_birth", I64),
        ("birth_datetime", pa.timestamp("us")),
        ("race_concept_id", I64),
        ("ethnicity_concept_id", I64),
        ("location_id", I64),
        ("care_site_id", I64),
        ("person_source_value", pa.string()),
    ],
    "observation_period": [
        ("observation_period_id", I64),
        ("person_id", I64),
        ("observation_period_start_date", DATE),
        ("observation_period_end_date", DATE),
        ("period_type_concept_id", I64),
    ],
    "visit_occurrence": [
        ("visit_occurrence_id", I64),
        ("person_id", I64),
        ("visit_concept_id", I64),
        ("visit_start_date", DATE),
        ("visit_end_date", DATE),
        ("visit_type_concept_id", I64),
        ("care_site_id", I64),
        ("admitted_from_concept_id", I64),
        ("discharged_to_concept_id", I64),
        ("preceding_visit_occurrence_id", I64),
    ],
    "condition_occurrence": [
        ("condition_occurrence_id", I64),
        ("person_id", I64),
        ("condition_concept_id", I64),
        ("condition_start_date", DATE),
        ("condition_end_date", DATE),
        ("condition_type_concept_id", I64),
        ("visit_occurrence_id", I64),
        ("condition_source_value", pa.string()),
    ],
    "death": [
        ("person_id", I64),
        ("death_date", DATE),
        ("death_type_concept_id", I64),
        ("cause_concept_id", I64),
    ],
    "location": [
        ("location_id", I64),
        ("city", pa.string()),
        ("county", pa.string()),
        ("location_source_value", pa.string()),
        ("country_source_value", pa.string()),
    ],
    "care_site": [
        ("care_site_id", I64),
        ("care_site_name", pa.string()),
        ("care_site_source_value", pa.string()),
    ],
}
# NOT NULL columns in the OMOP v5.4 DDL (the OHDSI CommonDataModel DDL).
REQUIRED: dict[str, set[str]] = {
    "person": {
        "person_id",
        "gender_concept_id",
        "year_of_birth",
        "race_concept_id",
        "ethnicity_concept_id",
    },
    "observation_period": {
        "observation_period_id",
        "person_id",
        "observation_period_start_date",
        "observation_period_end_date",
        "period_type_concept_id",
    },
    "visit_occurrence": {
        "visit_occurrence_id",
        "person_id",
        "visit_concept_id",
        "visit_start_date",
        "visit_end_date",
        "visit_type_concept_id",
    },
    "condition_occurrence": {
        "condition_occurrence_id",
        "person_id",
        "condition_concept_id",
        "condition_start_date",
        "condition_type_concept_id",
    },
    "death": {"person_id", "death_date"},
    "location": {"location_id"},
    "care_site": {"care_site_id"},
}


# --- Arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("persons", "seed", "ref", "chunk_size", "message"),
    [
        (0, 1, REF, 10, "persons"),
        (10, 1, REF, 0, "chunk_size"),
        (10, -1, REF, 10, "seed"),
        (10, 1, date(2014, 12, 31), 10, "reference_date"),
    ],
)
def test_generate_region_rejects_bad_arguments(
    tmp_path: Path, persons: int, seed: int, ref: date, chunk_size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        generate_region(
            REGIONS[0], persons, tmp_path, seed=seed, reference_date=ref, chunk_size=chunk_size
        )


# --- Determinism and files -------------------------------------------------------------


def test_same_seed_gives_identical_tables(tmp_path: Path) -> None:
    region = region_by_slug("gm")
    counts = generate_region(region, 3_000, tmp_path / "a", seed=7, chunk_size=1_000)
    generate_region(region, 3_000, tmp_path / "b", seed=7, chunk_size=1_000)
    generate_region(region, 3_000, tmp_path / "c", seed=8, chunk_size=1_000)
    a, b, c = load(tmp_path / "a"), load(tmp_path / "b"), load(tmp_path / "c")
    for name in TABLES:
        assert a[name].equals(b[name]), name
        assert counts[name] == a[name].num_rows
    assert not a["person"].equals(c["person"])
    assert not a["visit_occurrence"].equals(c["visit_occurrence"])


def test_schema_matches_omop(tmp_path: Path) -> None:
    generate_region(REGIONS[0], 500, tmp_path, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{t}.parquet" for t in TABLES] + [LOOKUP_FILE]
    )
    for name, expected in EXPECTED_COLUMNS.items():
        schema = pq.read_schema(tmp_path / f"{name}.parquet")
        assert [(f.name, f.type) for f in schema] == expected, name
        for f in schema:
            assert f.nullable == (f.name not in REQUIRED[name]), (name, f.name)


def test_federation_writes_each_region_with_its_own_seed(tmp_path: Path) -> None:
    folders = generate_federation(8_000, tmp_path / "one", seed=11)
    again = generate_federation(8_000, tmp_path / "two", seed=11)
    split = split_persons(8_000)
    assert list(folders) == [r.slug for r in REGIONS]
    births = []
    for slug, folder in folders.items():
        assert folder == tmp_path / "one" / slug
        tables = load(folder)
        assert tables["person"].num_rows == split[slug]
        check_valid(tables)
        for name in TABLES:
            assert tables[name].equals(load(again[slug])[name])
        births.append(col(tables["person"], "year_of_birth")[:1_000])
    for i in range(len(births)):
        for j in range(i + 1, len(births)):
            assert not np.array_equal(births[i], births[j])
    seeds = {region_seed(11, r) for r in REGIONS}
    assert len(seeds) == len(REGIONS)
    assert region_seed(11, REGIONS[0]) == region_seed(11, REGIONS[0])
    assert region_seed(12, REGIONS[0]) != region_seed(11, REGIONS[0])


# --- Chunking and reference dates ------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [7, 500, 200_000])
def test_chunking_gives_valid_data(tmp_path: Path, chunk_size: int) -> None:
    counts = generate_region(REGIONS[1], 1_200, tmp_path, seed=5, chunk_size=chunk_size)
    tables = load(tmp_path)
    assert counts["person"] == 1_200
    check_valid(tables)


def test_other_reference_date_on_leap_day(tmp_path: Path) -> None:
    ref = date(2020, 2, 29)
    generate_region(REGIONS[2], 3_000, tmp_path, seed=9, reference_date=ref, chunk_size=1_000)
    tables = load(tmp_path)
    check_valid(tables, ref)
    visits = tables["visit_occurrence"]
    first = col(visits, "visit_start_date").min()
    assert first >= days(ref - timedelta(days=3 * 365))


# --- The IMD lookup --------------------------------------------------------------------


def test_the_lookup_is_national_and_consistent(tmp_path: Path) -> None:
    path = write_imd_lookup(tmp_path / "lookup.csv")
    lookup = pacsv.read_csv(path)
    codes = lookup.column("lsoa_code").to_pylist()
    assert len(set(codes)) == len(codes)
    assert len(codes) == sum(r.population // PERSONS_PER_LSOA for r in REGIONS)
    decile = col(lookup, "imd_decile")
    assert np.array_equal(col(lookup, "imd_quintile"), (decile + 1) // 2)
    assert set(np.unique(decile)) == set(range(1, 11))
    assert lookup.equals(imd_lookup_table().cast(lookup.schema))
