"""The four CHC regions and what is designed to differ between them.

Holds each region's name and population, its residents' mix of IMD quintiles, the designed
regional multipliers on prevalence and readmission, and the public helpers on regions
(looking one up by slug, splitting a federation's persons by population, deriving a region's
seed). It is separate because these are the deliberate, documented inputs of the demo
(docs/synthetic-data.md) rather than how rows are drawn, and the CLI and demo need them
without the generator.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from coordinator.local.synth.omop import ALCOHOLIC_LIVER, COPD


@dataclass(frozen=True)
class Region:
    """A CHC region; ``population`` is used only for relative sizes and LSOA counts."""

    slug: str
    name: str
    population: int


REGIONS: Final[tuple[Region, ...]] = (
    Region("nenc", "North East and North Cumbria", 3_600_000),
    Region("nwc", "North West Coast", 4_000_000),
    Region("yh", "Yorkshire and Humber", 5_500_000),
    Region("gm", "Greater Manchester", 2_800_000),
)

# Share of each region's residents in national IMD 2019 quintiles 1 (most deprived) to 5.
# Nationally each quintile holds 20% [IoD]; the North has more of its
# neighbourhoods among the most deprived. Our approximation, see docs/synthetic-data.md.
IMD_SHARES: Final[Mapping[str, tuple[float, float, float, float, float]]] = {
    "nenc": (0.31, 0.21, 0.18, 0.16, 0.14),
    "nwc": (0.33, 0.19, 0.17, 0.16, 0.15),
    "yh": (0.29, 0.21, 0.18, 0.17, 0.15),
    "gm": (0.36, 0.21, 0.16, 0.14, 0.13),
}
NO_LOCATION_SHARE: Final = 0.02  # persons without a usable address: IMD unknown
PERSONS_PER_LSOA: Final = 1_500  # an LSOA holds about 1,500 residents

# Designed regional differences (docs/synthetic-data.md), so comparisons have a signal:
# relative multipliers on condition prevalence, and on 30-day readmission risk.
REGIONAL_PREVALENCE_MULTIPLIERS: Final[Mapping[str, Mapping[int, float]]] = {
    "nwc": {COPD: 1.5},
    "nenc": {ALCOHOLIC_LIVER: 1.6},
}
REGIONAL_READMISSION_MULTIPLIERS: Final[Mapping[str, float]] = {"gm": 1.6}


def region_by_slug(slug: str) -> Region:
    """Return the region with this slug or raise ValueError naming the valid slugs."""
    for region in REGIONS:
        if region.slug == slug:
            return region
    valid = ", ".join(r.slug for r in REGIONS)
    raise ValueError(f"unknown region slug {slug!r}; valid slugs: {valid}")


def split_persons(total: int) -> dict[str, int]:
    """Split total across REGIONS by population share (largest remainder), each at least 1."""
    if total < len(REGIONS):
        raise ValueError(f"total must be at least {len(REGIONS)} (one per region), got {total}")
    pop = sum(r.population for r in REGIONS)
    quotas = [total * r.population / pop for r in REGIONS]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(REGIONS)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    # Tiny totals can leave a region empty; borrow from the largest so every node has data.
    for i in range(len(counts)):
        if counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: counts[j])
            counts[donor] -= 1
            counts[i] = 1
    return {r.slug: c for r, c in zip(REGIONS, counts, strict=True)}


def _region_key(region: Region) -> int:
    # crc32 of the slug is stable across runs and Python versions, unlike hash().
    return zlib.crc32(region.slug.encode("utf-8"))


def region_seed(seed: int, region: Region) -> int:
    """Derive a region's 64-bit seed deterministically from a federation seed."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    state = np.random.SeedSequence(seed, spawn_key=(_region_key(region),)).generate_state(
        1, np.uint64
    )
    return int(state[0])


def imd_shares(region: Region) -> tuple[float, float, float, float, float]:
    """The region's share of residents in IMD quintiles 1-5 (before unknown addresses)."""
    return IMD_SHARES[region.slug]
