"""The OMOP CDM v5.4 side of the synthetic data: concept ids, table schemas, Arrow columns.

Holds the standard concept ids the generator writes, the Parquet schema of each table it
writes (NOT NULL columns as in the OMOP DDL) and the small helpers that turn numpy arrays into
typed Arrow columns. It is separate because it is the one place that knows the target format:
the regions, rates and draws elsewhere in the package speak plain numpy, and only the table
builders (and the location table) touch Arrow through these helpers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]

MALE: Final = 8507
FEMALE: Final = 8532
ASTHMA: Final = 317009
COPD: Final = 255573
EPILEPSY: Final = 380378
ALCOHOLIC_LIVER: Final = 201612
TYPE_2_DIABETES: Final = 201826
INPATIENT: Final = 9201
OUTPATIENT: Final = 9202
EMERGENCY_ROOM: Final = 9203
EHR_TYPE: Final = 32817

TABLE_NAMES: Final[tuple[str, ...]] = (
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "death",
    "location",
    "care_site",
)


def _field(name: str, kind: pa.DataType, *, required: bool = False) -> pa.Field:
    return pa.field(name, kind, nullable=not required)


_I64 = pa.int64()
_DATE = pa.date32()

SCHEMAS: Final[Mapping[str, pa.Schema]] = {
    "person": pa.schema(
        [
            _field("person_id", _I64, required=True),
            _field("gender_concept_id", _I64, required=True),
            _field("year_of_birth", _I64, required=True),
            _field("month_of_birth", _I64),
            _field("day_of_birth", _I64),
            _field("birth_datetime", pa.timestamp("us")),
            _field("race_concept_id", _I64, required=True),
            _field("ethnicity_concept_id", _I64, required=True),
            _field("location_id", _I64),
            _field("care_site_id", _I64),
            _field("person_source_value", pa.string()),
        ]
    ),
    "observation_period": pa.schema(
        [
            _field("observation_period_id", _I64, required=True),
            _field("person_id", _I64, required=True),
            _field("observation_period_start_date", _DATE, required=True),
            _field("observation_period_end_date", _DATE, required=True),
            _field("period_type_concept_id", _I64, required=True),
        ]
    ),
    "visit_occurrence": pa.schema(
        [
            _field("visit_occurrence_id", _I64, required=True),
            _field("person_id", _I64, required=True),
            _field("visit_concept_id", _I64, required=True),
            _field("visit_start_date", _DATE, required=True),
            _field("visit_end_date", _DATE, required=True),
            _field("visit_type_concept_id", _I64, required=True),
            _field("care_site_id", _I64),  # DDL order: after provider_id, which we omit
            _field("admitted_from_concept_id", _I64),
            _field("discharged_to_concept_id", _I64),
            _field("preceding_visit_occurrence_id", _I64),
        ]
    ),
    "condition_occurrence": pa.schema(
        [
            _field("condition_occurrence_id", _I64, required=True),
            _field("person_id", _I64, required=True),
            _field("condition_concept_id", _I64, required=True),
            _field("condition_start_date", _DATE, required=True),
            _field("condition_end_date", _DATE),
            _field("condition_type_concept_id", _I64, required=True),
            _field("visit_occurrence_id", _I64),
            _field("condition_source_value", pa.string()),
        ]
    ),
    "death": pa.schema(
        [
            _field("person_id", _I64, required=True),
            _field("death_date", _DATE, required=True),
            _field("death_type_concept_id", _I64),
            _field("cause_concept_id", _I64),
        ]
    ),
    "location": pa.schema(
        [
            _field("location_id", _I64, required=True),
            _field("city", pa.string()),
            _field("county", pa.string()),
            _field("location_source_value", pa.string()),
            _field("country_source_value", pa.string()),
        ]
    ),
    "care_site": pa.schema(
        [
            _field("care_site_id", _I64, required=True),
            _field("care_site_name", pa.string()),
            _field("care_site_source_value", pa.string()),
        ]
    ),
}


def _date_array(days: IntArray) -> pa.Array:
    return pa.array(days.astype("datetime64[D]"))


def _int_array(values: IntArray, mask: BoolArray | None = None) -> pa.Array:
    return pa.array(values, type=_I64, mask=mask)


def _const(value: int, n: int) -> pa.Array:
    return pa.array(np.full(n, value, dtype=np.int64), type=_I64)
