"""A known model to test fits against: who on the COPD pathway has an emergency admission.

Holds the documented coefficients (docs/synthetic-data.md, "A known model") of a logistic
model for the COPD pathway view's `admitted` (at least one COPD-related emergency admission in
the pathway's 365-day window), the ModelSpec that fits it, and the draws that make the
generated OMOP records follow it. It is separate because it is the one outcome the generator
decides per person from a formula rather than letting it emerge from the visit draws: for
every person the node will put on the pathway, `admitted` is drawn from the model, and the
visits and condition records of the window are then arranged so that the node's views
(node/data/views.py) derive exactly that value (events.py does the arranging).

The model's covariates are the view's own columns, as the node computes them: age at the
reference date or at death, its band, sex, IMD quintile, `deceased`, and the region.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from coordinator.local.synth.care_sites import WORSE_TRUST_EFFECT
from coordinator.local.synth.omop import BoolArray, FloatArray, IntArray
from coordinator.local.synth.people import _People, _Settings
from coordinator.local.synth.rates import _COPD_INDEX
from coordinator.local.synth.regions import REGIONS
from queries.model import INTERCEPT, Covariate, Family, ModelSpec, design_columns
from queries.schema import ViewSpec
from queries.spec import Filter

KNOWN_PATHWAY: Final = "copd"  # queries/pathways/copd.yaml
KNOWN_OUTCOME: Final = "admitted"
KNOWN_EVENT: Final = "yes"
KNOWN_WINDOW_DAYS: Final = 365  # the pathway's window_days
KNOWN_AGE_MIN: Final = 18  # the pathway's age_min
# The view's public bounds of `age`: the design scales age to (age - 18) / 102.
KNOWN_AGE_BOUNDS: Final = (18, 120)
KNOWN_REFERENCES: Final[Mapping[str, str]] = {
    "age_band": "40-64",
    "sex": "female",
    "imd_quintile": "1",
    "deceased": "no",
}
# No synthetic person has sex "unknown": a fit keeps the two levels that have persons.
KNOWN_SEXES: Final = ("female", "male")
KNOWN_BANDS_FROM_40: Final = ("40-64", "65-79", "80+")
KNOWN_QUINTILES: Final = ("1", "2", "3", "4", "5")

# log-odds of `admitted` = yes (docs/synthetic-data.md, "A known model"), by design column.
KNOWN_COEFFICIENTS: Final[Mapping[str, float]] = {
    "(intercept)": -2.0,
    "age_band[18-39]": -0.3,
    "age_band[65-79]": 1.0,
    "age_band[80+]": 2.1,
    "age": 1.0,  # per 102 years of age: about 0.1 a decade within the bands
    "sex[male]": 0.15,
    "imd_quintile[2]": -0.25,
    "imd_quintile[3]": -0.5,
    "imd_quintile[4]": -0.75,
    "imd_quintile[5]": -0.9,
    "imd_quintile[unknown]": -0.5,
    "deceased[yes]": 0.7,
}
# Region effects on the log-odds, against North East and North Cumbria (the first region).
KNOWN_REGION_EFFECTS: Final[Mapping[str, float]] = {
    "nenc": 0.0,
    "nwc": 0.25,
    "yh": -0.1,
    "gm": 0.15,
}
# The deliberately worse trust (care_sites.WORSE_TRUST): its home persons' log-odds rise by
# log(1.6). A fit of known_model takes it as a covariate "worse trust" (docs/synthetic-data.md).
KNOWN_TRUST_EFFECT: Final = WORSE_TRUST_EFFECT

_SLUGS: Final = tuple(region.slug for region in REGIONS)
# Index into the generator's arrays: age bands of the view from 18, then IMD 0-4 and unknown.
_BAND_EDGES: Final = np.array([40, 65, 80], dtype=np.int64)
_BAND_EFFECT: Final = np.array(
    [
        KNOWN_COEFFICIENTS["age_band[18-39]"],
        0.0,
        KNOWN_COEFFICIENTS["age_band[65-79]"],
        KNOWN_COEFFICIENTS["age_band[80+]"],
    ]
)
_IMD_EFFECT: Final = np.array(
    [0.0] + [KNOWN_COEFFICIENTS[f"imd_quintile[{q}]"] for q in ("2", "3", "4", "5", "unknown")]
)


def known_model(
    rho: float = 1.0,
    *,
    under_40: bool = True,
    unknown_address: bool = True,
    iterations: int | None = None,
) -> ModelSpec:
    """The model whose true coefficients are KNOWN_COEFFICIENTS and KNOWN_REGION_EFFECTS.

    For small regions: a node's design check refuses a level with fewer persons than its
    min_level_persons (10 by default, on a noisy count). under_40=False keeps persons aged
    40 and over (COPD starts at 35: the 18-39 band has about 200 persons a million
    residents); unknown_address=False keeps persons with an IMD quintile (2% have none).
    """
    where = [Filter("sex", KNOWN_SEXES)]
    if not under_40:
        where.insert(0, Filter("age_band", KNOWN_BANDS_FROM_40))
    if not unknown_address:
        where.append(Filter("imd_quintile", KNOWN_QUINTILES))
    return ModelSpec(
        view=KNOWN_PATHWAY,
        outcome=KNOWN_OUTCOME,
        family=Family.BINOMIAL,
        covariates=(
            Covariate("age_band", reference=KNOWN_REFERENCES["age_band"]),
            Covariate("age"),
            Covariate("sex", reference=KNOWN_REFERENCES["sex"]),
            Covariate("imd_quintile", reference=KNOWN_REFERENCES["imd_quintile"]),
            Covariate("deceased", reference=KNOWN_REFERENCES["deceased"]),
        ),
        rho=rho,
        region=True,
        event=KNOWN_EVENT,
        iterations=iterations,
        where=tuple(where),
    )


def known_coefficients(
    regions: Sequence[str] = _SLUGS, *, under_40: bool = True, unknown_address: bool = True
) -> dict[str, float]:
    """The true coefficients of known_model, by design column, with the hub's region order.

    Region effects are taken against regions[0], whose own effect moves into the intercept.
    """
    base = KNOWN_REGION_EFFECTS[regions[0]]
    out = dict(KNOWN_COEFFICIENTS)
    out["(intercept)"] += base
    if not under_40:
        del out["age_band[18-39]"]
    if not unknown_address:
        del out["imd_quintile[unknown]"]
    for slug in regions[1:]:
        out[f"region[{slug}]"] = KNOWN_REGION_EFFECTS[slug] - base
    return out


def _age_at(birth: IntArray, day: IntArray) -> IntArray:
    """Whole years from birth to day, as DuckDB's date_sub('year', ...) counts them.

    A birthday on the last day of a month falls on the last day of that month in years
    where it is shorter (29 February on 28 February), as the node's views count it.
    """
    b_days = birth.astype("datetime64[D]")
    d_days = day.astype("datetime64[D]")
    b_year = b_days.astype("datetime64[Y]")
    d_year = d_days.astype("datetime64[Y]")
    years = (d_year - b_year).astype(np.int64)
    # The birthday in day's year: birth's month and day, clipped to that month's length.
    b_month = b_days.astype("datetime64[M]")
    month_in_year = (b_month - b_year.astype("datetime64[M]")).astype(np.int64)
    day_in_month = (b_days - b_month.astype("datetime64[D]")).astype(np.int64)
    target_month = d_year.astype("datetime64[M]") + month_in_year
    month_length = ((target_month + 1).astype("datetime64[D]") - target_month).astype(np.int64)
    birthday = target_month.astype("datetime64[D]") + np.minimum(day_in_month, month_length - 1)
    before = (d_days < birthday).astype(np.int64)
    out: IntArray = years - before
    return out


@dataclass(frozen=True)
class _Known:
    """The known model's persons and draws in one chunk."""

    member: BoolArray  # on the COPD pathway view, as the node will build it
    admitted: BoolArray  # drawn from the model (False for non-members)
    window_start: int  # first day of the pathway's window

    @property
    def yes(self) -> BoolArray:
        """Members drawn to have a COPD-related emergency admission in the window."""
        out: BoolArray = self.member & self.admitted
        return out

    @property
    def no(self) -> BoolArray:
        """Members drawn to have none."""
        out: BoolArray = self.member & ~self.admitted
        return out


def _logit(
    people: _People, who: IntArray, age: IntArray, region: str, worse: BoolArray
) -> FloatArray:
    """The model's log-odds for persons `who`, whose view ages are `age` (`worse`: whose
    home trust is the deliberately worse one, care_sites.py)."""
    band = np.searchsorted(_BAND_EDGES, age, side="right")
    low, high = KNOWN_AGE_BOUNDS
    scaled = (np.clip(age, low, high) - low) / (high - low)
    out: FloatArray = (
        KNOWN_COEFFICIENTS["(intercept)"]
        + _BAND_EFFECT[band]
        + KNOWN_COEFFICIENTS["age"] * scaled
        + np.where(people.female[who], 0.0, KNOWN_COEFFICIENTS["sex[male]"])
        + _IMD_EFFECT[people.imd[who]]
        + np.where(people.died[who], KNOWN_COEFFICIENTS["deceased[yes]"], 0.0)
        + KNOWN_REGION_EFFECTS[region]
        + np.where(worse[who], KNOWN_TRUST_EFFECT, 0.0)
    )
    return out


def _draw_known(
    rng: np.random.Generator, people: _People, s: _Settings, worse: BoolArray
) -> _Known:
    """Who is on the pathway (the view's rules) and their `admitted`, drawn from the model."""
    window_start = s.cal.reference - KNOWN_WINDOW_DAYS + 1
    # The view's age is at death for those who died; everyone else's is the drawn age.
    age = people.ages.copy()
    dead = np.flatnonzero(people.died)
    age[dead] = _age_at(people.birth[dead], people.end[dead])
    member = (
        people.flags[_COPD_INDEX]
        & (age >= KNOWN_AGE_MIN)
        & (~people.died | (people.end >= window_start))
    )
    who = np.flatnonzero(member)
    p = 1.0 / (1.0 + np.exp(-_logit(people, who, age[who], s.region, worse)))
    admitted = np.zeros(member.shape[0], dtype=np.bool_)
    admitted[who] = rng.random(who.shape[0]) < p
    return _Known(member=member, admitted=admitted, window_start=window_start)


def pooled_design(
    model: ModelSpec, view: ViewSpec, rows: Mapping[str, pa.Table]
) -> tuple[tuple[str, ...], FloatArray, FloatArray]:
    """The pooled (non-private) design of a binomial model: (columns, X, y) over view rows.

    `rows` maps each region, in the hub's order, to its view's rows (categories as strings);
    the design follows queries/model.py: one-hot against the reference, numbers clamped to
    their bounds and scaled to [0, 1], a region indicator for every region but the first.
    It is the baseline a federated fit must equal as its budget grows.
    """
    columns = design_columns(model, view, list(rows))
    blocks: list[FloatArray] = []
    outcomes: list[FloatArray] = []
    event = model.event or KNOWN_EVENT
    for region, table in rows.items():
        keep = pa.array(np.ones(table.num_rows, dtype=np.bool_))
        for f in model.where:
            keep = pc.and_(keep, pc.is_in(table[f.column], pa.array(f.values)))
        kept = table.filter(keep)
        block = np.empty((kept.num_rows, len(columns)), dtype=np.float64)
        for j, name in enumerate(columns):
            block[:, j] = _design_column(model, view, kept, name, region)
        blocks.append(block)
        outcomes.append(np.asarray(pc.equal(kept[model.outcome], event), dtype=np.float64))
    return columns, np.concatenate(blocks), np.concatenate(outcomes)


def _design_column(
    model: ModelSpec, view: ViewSpec, table: pa.Table, name: str, region: str
) -> FloatArray:
    if name == INTERCEPT:
        return np.ones(table.num_rows, dtype=np.float64)
    if name.endswith("]"):
        column, level = name[:-1].split("[", 1)
        if column == "region":
            return np.full(table.num_rows, float(level == region))
        return np.asarray(pc.equal(table[column], level), dtype=np.float64)
    covariate = next(c for c in model.covariates if c.column == name)
    spec = view.column(name)
    low, high = covariate.clamp or (float(spec.lower or 0), float(spec.upper or 0))
    values = np.asarray(table[name], dtype=np.float64)
    out: FloatArray = (np.clip(values, low, high) - low) / (high - low)
    return out
