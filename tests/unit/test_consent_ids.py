"""Consent registers' person_ids are read exactly (node.data.registers): never rounded.

An id above 2^53 excludes exactly that person, whatever the file format; an id that is not an
exact whole number within BIGINT refuses the data, and the refusal names the file's lines (or
a Parquet file's data rows) and counts the rest; ids that match no person are a warning.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from node.data.consent import ConsentPolicy
from node.data.store import OmopStore
from node.data.validate import DataSettings, validate
from queries.errors import DataError
from tests.unit._consent_helpers import HEADER, included, register
from tests.unit.omop_testdata import REF, Omop, example, write

# 2^53 + 1 is the first integer a DOUBLE cannot hold: it rounds to 2^53.
BIG = 2**53
HUGE_IDS = (BIG, BIG + 1, BIG + 2, 2**63 - 2, 2**63 - 1)


@pytest.fixture(scope="module")
def big_ids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    omop = Omop()
    for pid in HUGE_IDS:
        omop.person(pid, date(1980, 1, 1))
    return write(omop, tmp_path_factory.mktemp("big") / "omop")  # Parquet, int64 person_id


def big_register(tmp: Path, fmt: str, ids: list[int]) -> Path:
    if fmt == "csv":
        return register(tmp / "reg.csv", [(i, "2024-01-01", "", "", "", "") for i in ids])
    person_id = pa.array(ids, pa.int64()) if fmt == "parquet-int64" else [str(i) for i in ids]
    path = tmp / "reg.parquet"
    pq.write_table(pa.table({"person_id": person_id, "date": ["2024-01-01"] * len(ids)}), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "parquet-int64", "parquet-text"])
@pytest.mark.parametrize("opted_out", [BIG + 1, BIG + 2, 2**63 - 1])
def test_an_id_above_2_to_the_53_excludes_exactly_that_person(
    big_ids: Path, tmp_path: Path, fmt: str, opted_out: int
) -> None:
    # Through DOUBLE, 2^53 + 1 became 2^53 (the wrong person out, the right one in).
    reg = big_register(tmp_path, fmt, [opted_out])
    assert included(big_ids, ConsentPolicy(registers=(reg,))) == set(HUGE_IDS) - {opted_out}


def test_blanks_signs_and_leading_zeros_around_an_id_are_accepted(tmp_path: Path) -> None:
    omop = Omop()
    for pid in (1, 2, 3, 4):
        omop.person(pid, date(1980, 1, 1))
    source = write(omop, tmp_path / "omop")
    reg = register(
        tmp_path / "reg.csv",
        [(pid, "2024-01-01", "", "", "", "") for pid in ("  1 ", "+2", "003")],
    )
    assert included(source, ConsentPolicy(registers=(reg,))) == {4}


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("12.6", "missing or not a whole number"),  # DuckDB's cast rounds it to 13
        ("13.0", "missing or not a whole number"),
        ("1e3", "missing or not a whole number"),
        ("0x1F", "missing or not a whole number"),
        ("1_000", "missing or not a whole number"),
        ("abc", "missing or not a whole number"),
        ("", "missing or not a whole number"),
        ("9223372036854775808", "outside the range"),  # 2^63
        ("-9223372036854775809", "outside the range"),
        ("9" * 50, "outside the range"),
    ],
)
def test_an_id_that_is_not_an_exact_whole_number_refuses_the_data(
    tmp_path: Path, value: str, problem: str
) -> None:
    omop = Omop()
    for pid in (12, 13):
        omop.person(pid, date(1980, 1, 1))
    source = write(omop, tmp_path / "omop")
    reg = register(
        tmp_path / "reg.csv",
        [(12, "2024-01-01", "", "", "", ""), (value, "2024-01-01", "", "", "", "")],
    )
    with pytest.raises(DataError) as refused:
        OmopStore(source, [], reference_date=REF, consent=ConsentPolicy(registers=(reg,)))
    text = str(refused.value)
    assert f"consent register {reg} [1]: person_id is {problem}" in text
    assert f"line 3 ({value!r})" in text  # the header is line 1
    assert "correct or remove these rows" in text


def test_the_refusal_gives_the_first_lines_and_counts_the_rest(tmp_path: Path) -> None:
    # Many rows (DuckDB reads them in parallel), a blank line and a field spanning two lines
    # before the bad rows: the line numbers must still be the file's.
    source = write(example(), tmp_path / "omop")
    good = "1,2024-01-01,ndoo,opt_out,self,no\n"
    lines = [",".join(HEADER) + "\n", good * 20_000, "\n", '"2",2024-01-01,"lo\ncal",,,\n']
    bad_at = []
    for i in range(7):
        lines.append(good * 1_000)
        bad_at.append(sum(chunk.count("\n") for chunk in lines) + 1)
        lines.append(f"{i}.5,2024-01-01,ndoo,opt_out,self,no\n")
    reg = tmp_path / "big.csv"
    reg.write_text("".join(lines))
    report = validate(
        DataSettings(omop=source, reference_date=REF, consent=ConsentPolicy(registers=(reg,))),
        [],
        threads=2,
    )
    errors = [f for f in report.errors if f.where == f"consent register {reg}"]
    assert [(f.count, f.message.split(" (")[0].split(";")[0]) for f in errors] == [
        (7, "person_id is missing or not a whole number"),
        (1, "source is not ndoo or local"),  # the field spanning two lines: 'lo\ncal'
    ]
    shown = ", ".join(f"{n} ('{i}.5')" for i, n in enumerate(bad_at[:5]))
    assert errors[0].detail == f"lines {shown} and 2 more"
    assert errors[1].detail == f"line {20_002 + 1} ('lo\\ncal')"


def test_a_parquet_register_gives_data_rows(tmp_path: Path) -> None:
    source = write(example(), tmp_path / "omop")
    reg = tmp_path / "reg.parquet"
    pq.write_table(pa.table({"person_id": ["1", "12.6"], "date": ["2024-01-01"] * 2}), reg)
    with pytest.raises(DataError, match=r"data row 2 \('12.6'\)"):
        OmopStore(source, [], reference_date=REF, consent=ConsentPolicy(registers=(reg,)))


def test_a_floating_point_id_column_refuses_the_data(tmp_path: Path) -> None:
    source = write(example(), tmp_path / "omop")
    reg = tmp_path / "reg.parquet"
    pq.write_table(pa.table({"person_id": [1.0, 2.0], "date": ["2024-01-01"] * 2}), reg)
    with pytest.raises(DataError, match="person_id is stored as DOUBLE"):
        OmopStore(source, [], reference_date=REF, consent=ConsentPolicy(registers=(reg,)))


def test_ids_that_match_no_person_are_a_warning_with_examples(tmp_path: Path) -> None:
    source = write(example(), tmp_path / "omop")
    known = register(tmp_path / "known.csv", [(5, "2024-01-01", "", "", "", "")])
    unknown = register(
        tmp_path / "unknown.csv",
        [(pid, "2024-01-01", "", "", "", "") for pid in (907, 901, 907, 902, 903, 904, 905, 906)]
        + [(2, "2024-01-01", "", "", "", "")],
    )
    store = OmopStore(
        source, [], reference_date=REF, consent=ConsentPolicy(registers=(known, unknown))
    )
    try:
        warned = [f for f in store.report.warnings if f.where.startswith("consent register")]
        assert [(f.where, f.count, f.detail) for f in warned] == [
            (f"consent register {unknown}", 7, "e.g. 907, 901, 902, 903, 904 and 2 more")
        ]
        assert store.report.ok  # a warning: the other decisions still apply
        persons = {r["person_id"] for r in store.query("SELECT person_id FROM persons").to_pylist()}
        assert {2, 5}.isdisjoint(persons)  # two adults, one opted out in each file
    finally:
        store.close()
