"""Generating a region or a federation: seeding, chunking and streaming to Parquet.

Holds ``generate_region``, which checks its arguments, fixes the region's settings, draws
persons chunk by chunk from ``SeedSequence(seed, spawn_key=(region key, k))`` and streams each
table through a ``pyarrow.parquet.ParquetWriter`` (plus the IMD lookup CSV), and
``generate_federation``, which does so for every region with its own seed. It is separate
because it is the only part that touches files and owns determinism across chunks.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from coordinator.local.synth.areas import LOOKUP_FILE, _areas, _location_table, write_imd_lookup
from coordinator.local.synth.care_sites import (
    TRUSTS,
    _home_trusts,
    _visit_trusts,
    _worse,
    care_site_table,
)
from coordinator.local.synth.events import _draw_conditions, _draw_visits
from coordinator.local.synth.known import _draw_known
from coordinator.local.synth.omop import SCHEMAS, TABLE_NAMES
from coordinator.local.synth.people import (
    _anniversaries,
    _Calendar,
    _days,
    _draw_people,
    _Settings,
)
from coordinator.local.synth.rates import _OBSERVATION_START, _WINDOW_DAYS
from coordinator.local.synth.regions import (
    REGIONAL_PREVALENCE_MULTIPLIERS,
    REGIONAL_READMISSION_MULTIPLIERS,
    Region,
    _region_key,
    region_by_slug,
    region_seed,
    split_persons,
)
from coordinator.local.synth.tables import (
    _condition_table,
    _death_table,
    _observation_table,
    _person_table,
    _visit_table,
)

# The last spawn-key entry of the care-site stream of a chunk (known.py has none of its own).
_CARE_SITE_STREAM = 1


def _chunk_tables(
    rng: np.random.Generator,
    n: int,
    s: _Settings,
    first_ids: Mapping[str, int],
    site_rng: np.random.Generator,
) -> dict[str, pa.Table]:
    people = _draw_people(rng, n, s)
    home = _home_trusts(site_rng, n, s.region)
    known = _draw_known(rng, people, s, _worse(home))
    visits = _draw_visits(rng, people, s, first_ids["visit"], known)
    sites = _visit_trusts(site_rng, home, visits.person_index, s.region)
    conds = _draw_conditions(rng, people, visits, first_ids["condition"], known)
    first_person = first_ids["person"]
    person_id = first_person + np.arange(n, dtype=np.int64)
    return {
        "person": _person_table(people, person_id, home),
        "observation_period": _observation_table(people, person_id),
        "visit_occurrence": _visit_table(visits, first_person, sites),
        "condition_occurrence": _condition_table(conds, first_person),
        "death": _death_table(rng, people, person_id),
    }


def generate_region(
    region: Region,
    persons: int,
    out_dir: Path,
    *,
    seed: int,
    reference_date: date = date(2025, 12, 31),
    chunk_size: int = 200_000,
) -> dict[str, int]:
    """Write one region's synthetic OMOP tables to out_dir/<table>.parquet; return row counts.

    Also writes out_dir/lsoa_imd.csv, the LSOA -> IMD lookup a node needs as `imd_lookup`.
    """
    if persons < 1:
        raise ValueError(f"persons must be at least 1, got {persons}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if reference_date < _OBSERVATION_START:
        raise ValueError(f"reference_date must be on or after {_OBSERVATION_START.isoformat()}")

    reference = _days(reference_date)
    observation_start = _days(_OBSERVATION_START)
    settings = _Settings(
        cal=_Calendar(
            reference=reference,
            window_start=max(reference - _WINDOW_DAYS + 1, observation_start),
            observation_start=observation_start,
            anniversaries=_anniversaries(reference_date),
        ),
        areas=_areas(region.slug),
        prevalence=REGIONAL_PREVALENCE_MULTIPLIERS.get(region.slug, {}),
        readmission=REGIONAL_READMISSION_MULTIPLIERS.get(region.slug, 1.0),
        region=region.slug,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(TABLE_NAMES, 0)
    writers: dict[str, pq.ParquetWriter] = {}
    try:
        for name in TABLE_NAMES:
            writers[name] = pq.ParquetWriter(out_dir / f"{name}.parquet", SCHEMAS[name])
        location = _location_table(region)
        writers["location"].write_table(location)
        counts["location"] = location.num_rows
        writers["care_site"].write_table(care_site_table())
        counts["care_site"] = len(TRUSTS)
        for index, first in enumerate(range(0, persons, chunk_size)):
            sequence = np.random.SeedSequence(seed, spawn_key=(_region_key(region), index))
            rng = np.random.Generator(np.random.PCG64(sequence))
            # Care sites draw from a stream of their own: the other draws stay as they were.
            site_sequence = np.random.SeedSequence(
                seed, spawn_key=(_region_key(region), index, _CARE_SITE_STREAM)
            )
            site_rng = np.random.Generator(np.random.PCG64(site_sequence))
            first_ids = {
                "person": first + 1,
                "visit": counts["visit_occurrence"] + 1,
                "condition": counts["condition_occurrence"] + 1,
            }
            n = min(chunk_size, persons - first)
            for name, table in _chunk_tables(rng, n, settings, first_ids, site_rng).items():
                writers[name].write_table(table)
                counts[name] += table.num_rows
    finally:
        for writer in writers.values():
            writer.close()
    write_imd_lookup(out_dir / LOOKUP_FILE)
    return counts


def generate_federation(total_persons: int, out_dir: Path, *, seed: int) -> dict[str, Path]:
    """Write every region to out_dir/<slug>/ with per-region seeds; return slug -> folder."""
    folders: dict[str, Path] = {}
    for slug, persons in split_persons(total_persons).items():
        region = region_by_slug(slug)
        folder = out_dir / slug
        generate_region(region, persons, folder, seed=region_seed(seed, region))
        folders[slug] = folder
    return folders
