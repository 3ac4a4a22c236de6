"""Seeded synthetic OMOP CDM v5.4 data for the four Connected Health Cities (CHC) regions.

Writes person, observation_period, visit_occurrence, condition_occurrence, death, location
and care_site (the regions' NHS trusts, ``care_sites``) as one Parquet file per table, plus
``lsoa_imd.csv``: a (synthetic) national lookup from LSOA code to IMD 2019 decile and
quintile, which a node reads as its ``imd_lookup`` (it is not an OMOP table; the node ignores
it as an extra file). Persons are generated in chunks with numpy
(no per-person Python loops) and streamed through ``pyarrow.parquet.ParquetWriter`` so memory
stays bounded at 1M+ persons. This is synthetic test data, not privacy noise, so an ordinary
seeded ``numpy.random.Generator`` (PCG64) is used.

What the data is meant to look like, every assumption, its source and the designed regional
differences are in docs/synthetic-data.md; the constants in the modules carry short notes
only. Figures are cited by the source keys of docs/synthetic-data.md. The package is split
into ``regions`` (the four regions and their designed differences), ``rates`` (national
rates), ``areas`` (LSOAs and the IMD lookup), ``people`` and ``events`` (the draws),
``omop`` and ``tables`` (the OMOP format), ``known`` (the known model of the COPD pathway's
admissions, to test fits against) and ``generate`` (chunks, seeds and files); this
module exposes the names callers use as ``synth.<name>``.

Determinism: chunk ``k`` of a region is drawn from ``SeedSequence(seed, spawn_key=(region
key, k))``, so the same seed, region, size, reference date and chunk size give identical
rows. A different chunk size gives different rows with the same distribution. The LSOA
lookup and each region's LSOAs do not depend on the seed (like a published national file).
"""

from coordinator.local.synth.areas import LOOKUP_FILE, imd_lookup_table, write_imd_lookup
from coordinator.local.synth.care_sites import (
    TRUSTS,
    WORSE_TRUST,
    WORSE_TRUST_ODDS,
    Trust,
    care_site_id,
    care_site_table,
    region_trusts,
)
from coordinator.local.synth.generate import generate_federation, generate_region
from coordinator.local.synth.intervention import INTERVENTION, Intervention
from coordinator.local.synth.known import (
    KNOWN_AGE_BOUNDS,
    KNOWN_AGE_MIN,
    KNOWN_COEFFICIENTS,
    KNOWN_EVENT,
    KNOWN_OUTCOME,
    KNOWN_PATHWAY,
    KNOWN_REGION_EFFECTS,
    KNOWN_TRUST_EFFECT,
    KNOWN_WINDOW_DAYS,
    known_coefficients,
    known_model,
    pooled_design,
)
from coordinator.local.synth.omop import SCHEMAS, TABLE_NAMES
from coordinator.local.synth.regions import (
    IMD_SHARES,
    NO_LOCATION_SHARE,
    PERSONS_PER_LSOA,
    REGIONS,
    Region,
    imd_shares,
    region_by_slug,
    region_seed,
    split_persons,
)

__all__ = [
    "IMD_SHARES",
    "INTERVENTION",
    "KNOWN_AGE_BOUNDS",
    "KNOWN_AGE_MIN",
    "KNOWN_COEFFICIENTS",
    "KNOWN_EVENT",
    "KNOWN_OUTCOME",
    "KNOWN_PATHWAY",
    "KNOWN_REGION_EFFECTS",
    "KNOWN_TRUST_EFFECT",
    "KNOWN_WINDOW_DAYS",
    "LOOKUP_FILE",
    "NO_LOCATION_SHARE",
    "PERSONS_PER_LSOA",
    "REGIONS",
    "SCHEMAS",
    "TABLE_NAMES",
    "TRUSTS",
    "WORSE_TRUST",
    "WORSE_TRUST_ODDS",
    "Intervention",
    "Region",
    "Trust",
    "care_site_id",
    "care_site_table",
    "generate_federation",
    "generate_region",
    "imd_lookup_table",
    "imd_shares",
    "known_coefficients",
    "known_model",
    "pooled_design",
    "region_by_slug",
    "region_seed",
    "region_trusts",
    "split_persons",
    "write_imd_lookup",
]
