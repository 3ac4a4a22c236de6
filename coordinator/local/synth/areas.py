"""LSOAs and the synthetic national LSOA -> IMD 2019 lookup (``lsoa_imd.csv``).

Holds each region's LSOAs (their location ids, codes, deciles and quintiles), the OMOP
``location`` table built from them and the lookup a node reads as its ``imd_lookup``. It is
separate because the areas do not depend on the seed, like a published national file: they
are fixed by the regions alone and shared by every chunk and every region's output folder.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from coordinator.local.synth.omop import _I64, SCHEMAS, IntArray, _int_array
from coordinator.local.synth.regions import IMD_SHARES, PERSONS_PER_LSOA, REGIONS, Region

LOOKUP_FILE: Final = "lsoa_imd.csv"

_LOOKUP_SEED: Final = 20_190_926  # IoD2019 publication date; the lookup ignores the seed


@dataclass(frozen=True)
class _Areas:
    """A region's LSOAs: location ids first_id.., their codes and IMD quintiles (1-5)."""

    first_id: int
    codes: tuple[str, ...]
    quintile: IntArray
    decile: IntArray


@functools.cache
def _areas(slug: str) -> _Areas:
    first = 1
    for region in REGIONS:
        n = max(1, region.population // PERSONS_PER_LSOA)
        if region.slug == slug:
            break
        first += n
    else:  # pragma: no cover - callers pass known slugs
        raise ValueError(slug)
    shares = np.array(IMD_SHARES[slug])
    quotas = shares * n
    counts = np.floor(quotas).astype(np.int64)
    for i in np.argsort(counts - quotas)[: n - int(counts.sum())]:
        counts[i] += 1
    quintile = np.repeat(np.arange(1, 6, dtype=np.int64), counts)
    # Within a quintile, alternate its two deciles (quintile q holds deciles 2q-1 and 2q).
    rank = np.arange(n, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    decile = 2 * quintile - 1 + rank % 2
    rng = np.random.Generator(
        np.random.PCG64(
            np.random.SeedSequence(_LOOKUP_SEED, spawn_key=(zlib.crc32(slug.encode("utf-8")),))
        )
    )
    order = rng.permutation(n)
    codes = tuple(f"Z01{first + i:06d}" for i in range(n))
    return _Areas(first, codes, quintile[order], decile[order])


def _location_table(region: Region) -> pa.Table:
    areas = _areas(region.slug)
    n = len(areas.codes)
    return pa.Table.from_arrays(
        [
            _int_array(areas.first_id + np.arange(n, dtype=np.int64)),
            pa.nulls(n, pa.string()),
            pa.array([region.name] * n, pa.string()),
            pa.array(areas.codes, pa.string()),
            pa.array(["GB"] * n, pa.string()),
        ],
        schema=SCHEMAS["location"],
    )


def imd_lookup_table() -> pa.Table:
    """The synthetic national LSOA -> IMD lookup, like File 1 of the IoD2019 (as CSV)."""
    codes: list[str] = []
    deciles: list[IntArray] = []
    quintiles: list[IntArray] = []
    for region in REGIONS:
        areas = _areas(region.slug)
        codes += areas.codes
        deciles.append(areas.decile)
        quintiles.append(areas.quintile)
    return pa.table(
        {
            "lsoa_code": pa.array(codes, pa.string()),
            "imd_decile": pa.array(np.concatenate(deciles), _I64),
            "imd_quintile": pa.array(np.concatenate(quintiles), _I64),
        }
    )


def write_imd_lookup(path: Path) -> Path:
    """Write the synthetic LSOA -> IMD lookup as CSV (a node's `imd_lookup`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(imd_lookup_table(), path)
    return path
