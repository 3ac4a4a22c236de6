"""Tests for the regions of the synthetic OMOP generator: lookup and splitting persons."""

from __future__ import annotations

import pytest

from coordinator.local.synth.regions import REGIONS, region_by_slug, split_persons

# --- Regions and splitting -------------------------------------------------------------


def test_regions_match_brief() -> None:
    assert [(r.slug, r.population) for r in REGIONS] == [
        ("nenc", 3_600_000),
        ("nwc", 4_000_000),
        ("yh", 5_500_000),
        ("gm", 2_800_000),
    ]
    assert region_by_slug("yh").name == "Yorkshire and Humber"


def test_region_by_slug_error_lists_valid_slugs() -> None:
    with pytest.raises(ValueError, match="unknown region slug 'ne'") as info:
        region_by_slug("ne")
    for region in REGIONS:
        assert region.slug in str(info.value)


def test_split_persons_sums_and_every_region_gets_someone() -> None:
    # Exhaustive over small totals (where rounding bites) plus a spread of large ones.
    totals = [*range(4, 3_000), 40_000, 1_000_003, 999_999_937]
    for total in totals:
        split = split_persons(total)
        assert list(split) == [r.slug for r in REGIONS]
        assert sum(split.values()) == total
        assert min(split.values()) >= 1


def test_split_persons_follows_population_share() -> None:
    split = split_persons(1_000_000)
    pop = sum(r.population for r in REGIONS)
    for region in REGIONS:
        assert abs(split[region.slug] - 1_000_000 * region.population / pop) < 1
    assert split_persons(4) == {"nenc": 1, "nwc": 1, "yh": 1, "gm": 1}


def test_split_persons_rejects_fewer_than_one_per_region() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        split_persons(3)
