"""Care sites: the NHS acute hospital trusts of each region, and which one a visit is at.

Holds the trusts (their public names and NHS ODS organisation codes, docs/synthetic-data.md
"Care sites"), the OMOP `care_site` table every region writes, each person's home trust (the
OMOP person.care_site_id) and each visit's trust, and the one trust made deliberately worse
(WORSE_TRUST: its COPD patients' odds of a COPD-related emergency admission are multiplied by
WORSE_TRUST_ODDS, in the known model, known.py). It is separate because it is the provider
side of the data, which the node publishes only where its custodian declares the sites.

The draws use a generator of their own (generate.py), so adding care sites leaves every other
draw of a chunk as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa

from coordinator.local.synth.omop import _I64, SCHEMAS, BoolArray, IntArray, _int_array


@dataclass(frozen=True)
class Trust:
    """An NHS trust: its ODS code (care_site_source_value), name and region slug."""

    code: str
    name: str
    region: str


# Real acute trusts and their ODS codes [ODS]; a selection, not every trust of each region.
# The worse trust's region has ten: compared within its region, a worse trust pulls its
# region's expected rate up by its excess over the region's trusts, and with ten the others
# are pulled by a tenth of it, which the funnel's limits absorb (docs/synthetic-data.md).
TRUSTS: Final[tuple[Trust, ...]] = (
    Trust("RTD", "The Newcastle upon Tyne Hospitals NHS Foundation Trust", "nenc"),
    Trust("RTR", "South Tees Hospitals NHS Foundation Trust", "nenc"),
    Trust("RXP", "County Durham and Darlington NHS Foundation Trust", "nenc"),
    Trust("RTF", "Northumbria Healthcare NHS Foundation Trust", "nenc"),
    Trust("R0B", "South Tyneside and Sunderland NHS Foundation Trust", "nenc"),
    Trust("RXN", "Lancashire Teaching Hospitals NHS Foundation Trust", "nwc"),
    Trust("RXL", "Blackpool Teaching Hospitals NHS Foundation Trust", "nwc"),
    Trust("RXR", "East Lancashire Hospitals NHS Trust", "nwc"),
    Trust("REM", "Liverpool University Hospitals NHS Foundation Trust", "nwc"),
    Trust("RBL", "Wirral University Teaching Hospital NHS Foundation Trust", "nwc"),
    Trust("RTX", "University Hospitals of Morecambe Bay NHS Foundation Trust", "nwc"),
    Trust("RBN", "Mersey and West Lancashire Teaching Hospitals NHS Trust", "nwc"),
    Trust("RJR", "Countess of Chester Hospital NHS Foundation Trust", "nwc"),
    Trust("RWW", "Warrington and Halton Teaching Hospitals NHS Foundation Trust", "nwc"),
    Trust("RBT", "Mid Cheshire Hospitals NHS Foundation Trust", "nwc"),
    Trust("RR8", "Leeds Teaching Hospitals NHS Trust", "yh"),
    Trust("RHQ", "Sheffield Teaching Hospitals NHS Foundation Trust", "yh"),
    Trust("RAE", "Bradford Teaching Hospitals NHS Foundation Trust", "yh"),
    Trust("RWA", "Hull University Teaching Hospitals NHS Trust", "yh"),
    Trust("RCB", "York and Scarborough Teaching Hospitals NHS Foundation Trust", "yh"),
    Trust("R0A", "Manchester University NHS Foundation Trust", "gm"),
    Trust("RM3", "Northern Care Alliance NHS Foundation Trust", "gm"),
    Trust("RMC", "Bolton NHS Foundation Trust", "gm"),
    Trust("RWJ", "Stockport NHS Foundation Trust", "gm"),
)
# care_site_id of TRUSTS[i]; the same in every region's care_site table.
FIRST_CARE_SITE_ID: Final = 1
# The synthetic data's one deliberately worse trust (says nothing about the real one).
WORSE_TRUST: Final = "RXL"
WORSE_TRUST_ODDS: Final = 1.6
WORSE_TRUST_EFFECT: Final = math.log(WORSE_TRUST_ODDS)  # on the known model's log-odds
# Where a visit is: the person's home trust, another trust of the region, or one elsewhere.
HOME_SHARE: Final = 0.90
REGION_SHARE: Final = 0.07  # the rest (3%) at a trust of any region

_CODES: Final = tuple(t.code for t in TRUSTS)
_WORSE_INDEX: Final = _CODES.index(WORSE_TRUST)


def region_trusts(slug: str) -> tuple[Trust, ...]:
    """The trusts of a region (persons of the region have one of them as home trust)."""
    return tuple(t for t in TRUSTS if t.region == slug)


def care_site_id(code: str) -> int:
    """The care_site_id the synthetic data gives the trust with this ODS code."""
    return FIRST_CARE_SITE_ID + _CODES.index(code)


def care_site_table() -> pa.Table:
    """The OMOP care_site table: every trust, so out-of-region visits resolve too."""
    n = len(TRUSTS)
    return pa.Table.from_arrays(
        [
            _int_array(FIRST_CARE_SITE_ID + np.arange(n, dtype=np.int64)),
            pa.array([t.name for t in TRUSTS], type=pa.string()),
            pa.array(_CODES, type=pa.string()),
        ],
        schema=SCHEMAS["care_site"],
    )


def _home_trusts(rng: np.random.Generator, n: int, region: str) -> IntArray:
    """Each person's home trust (index into TRUSTS), equally likely among the region's."""
    local = np.array([i for i, t in enumerate(TRUSTS) if t.region == region], dtype=np.int64)
    out: IntArray = local[rng.integers(0, local.shape[0], n)]
    return out


def _worse(home: IntArray) -> BoolArray:
    """Whether each person's home trust is WORSE_TRUST."""
    out: BoolArray = home == _WORSE_INDEX
    return out


def _visit_trusts(
    rng: np.random.Generator, home: IntArray, person_index: IntArray, region: str
) -> IntArray:
    """Each visit's trust (index into TRUSTS): mostly its person's home trust."""
    m = person_index.shape[0]
    local = np.array([i for i, t in enumerate(TRUSTS) if t.region == region], dtype=np.int64)
    u = rng.random(m)
    out: IntArray = np.where(
        u < HOME_SHARE,
        home[person_index],
        np.where(
            u < HOME_SHARE + REGION_SHARE,
            local[rng.integers(0, local.shape[0], m)],
            rng.integers(0, len(TRUSTS), m),
        ),
    ).astype(np.int64)
    return out


def _ids(index: IntArray) -> pa.Array:
    return pa.array(FIRST_CARE_SITE_ID + index, type=_I64)
