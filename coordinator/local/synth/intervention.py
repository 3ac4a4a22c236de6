"""The one intervention with a known effect, to test interrupted time series and DiD against.

From INTERVENTION.start, in INTERVENTION.region, each hospital stay of a person with asthma
who is under 18 on the stay's first day is kept with probability INTERVENTION.rate_ratio
(drawn independently, after every other draw of the stay): 20% of them are avoided. Whether
a kept stay is an emergency admission, and whether asthma is recorded on it, does not depend
on the dropped ones, so the expected monthly count of the `asthma_children` pathway's
emergency admissions (node view `asthma_children_admissions`) falls by exactly that ratio
from that month, and no other region changes. docs/synthetic-data.md, "The intervention".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Final

import numpy as np

from coordinator.local.synth.omop import ASTHMA, BoolArray, IntArray
from coordinator.local.synth.rates import _EPOCH


@dataclass(frozen=True)
class Intervention:
    """A change in one region from one month: a pathway's admissions scaled by rate_ratio."""

    region: str
    pathway: str
    start: date
    rate_ratio: float
    concept_id: int
    age_max: int  # the ages it applies to, on the stay's first day: 0..age_max

    @property
    def start_month(self) -> str:
        """The first month affected, YYYY-MM."""
        return f"{self.start.year}-{self.start.month:02d}"


# A paediatric asthma programme in North West Coast from April 2024. The month is within the
# three years of visits the generator draws before the default reference date (2025-12-31),
# leaving 15 months before and 21 after.
INTERVENTION: Final = Intervention(
    region="nwc",
    pathway="asthma_children",
    start=date(2024, 4, 1),
    rate_ratio=0.8,
    concept_id=ASTHMA,
    age_max=17,
)


def _age_on(birth: IntArray, day: IntArray) -> IntArray:
    """Whole years from birth to day (day numbers), as DuckDB's date_sub('year', ...)."""
    b = birth.astype("datetime64[D]")
    d = day.astype("datetime64[D]")
    b_year, d_year = b.astype("datetime64[Y]"), d.astype("datetime64[Y]")
    b_month, d_month = b.astype("datetime64[M]"), d.astype("datetime64[M]")
    b_key = (b_month - b_year).astype(np.int64) * 32 + (b - b_month).astype(np.int64)
    d_key = (d_month - d_year).astype(np.int64) * 32 + (d - d_month).astype(np.int64)
    years = d_year.astype(np.int64) - b_year.astype(np.int64)
    out: IntArray = years - (d_key < b_key).astype(np.int64)
    return out


def kept(
    rng: np.random.Generator,
    region: str,
    birth: IntArray,
    has_condition: BoolArray,
    who: IntArray,
    start: IntArray,
) -> BoolArray:
    """Which of the stays (persons `who`, first days `start`) survive the intervention."""
    keep = np.ones(who.shape[0], dtype=np.bool_)
    if region != INTERVENTION.region:
        return keep  # no draw: the other regions' rows are unchanged
    first_day = (INTERVENTION.start - _EPOCH).days
    at_risk = np.flatnonzero(
        (start >= first_day)
        & has_condition[who]
        & (_age_on(birth[who], start) <= INTERVENTION.age_max)
    )
    keep[at_risk] = rng.random(at_risk.shape[0]) < INTERVENTION.rate_ratio
    return keep
