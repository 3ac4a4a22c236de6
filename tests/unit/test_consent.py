"""Opt-outs and children's consent (node.data.consent): who a register excludes, and why.

The rules of which decision counts (own or a parent's, by age and Gillick competence; national
and local registers apart), the report they give, bad or missing registers refusing the data,
and the [consent] table of node.toml.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from node.data.consent import ConsentPolicy, parse_consent
from node.data.findings import Level
from node.data.store import OmopStore
from node.data.validate import DataSettings, validate
from queries.errors import ConfigError, DataError
from tests.unit._consent_helpers import HEADER, included, register
from tests.unit.omop_testdata import REF, Omop, example, write

# person_id: (birth date, decisions as (date, source, decision, decided_by, gillick))
PEOPLE: dict[int, tuple[date, list[tuple[str, str, str, str, str]]]] = {
    # adults
    101: (date(1985, 1, 1), [("2023-01-01", "ndoo", "opt_out", "self", "")]),
    102: (
        date(1985, 1, 1),
        [
            ("2020-01-01", "local", "opt_out", "self", ""),
            ("2022-01-01", "local", "opt_in", "self", ""),
        ],
    ),
    103: (
        date(1985, 1, 1),
        [
            ("2020-01-01", "ndoo", "opt_out", "self", ""),
            ("2022-01-01", "local", "opt_in", "self", ""),  # a local opt-in: NDOO still holds
        ],
    ),
    104: (
        date(1985, 1, 1),
        [
            ("2024-05-05", "local", "opt_in", "self", ""),
            ("2024-05-05", "local", "dissent", "self", ""),  # same day: the opt-out wins
        ],
    ),
    # under 13: the parent decides
    110: (date(2015, 6, 1), [("2024-01-01", "ndoo", "opt_out", "parent", "")]),
    111: (date(2015, 6, 1), [("2024-01-01", "local", "opt_out", "self", "yes")]),  # ignored
    # 13-15: the child's own decision if Gillick-competent, else the parent's
    120: (date(2011, 1, 1), [("2025-02-01", "local", "opt_out", "self", "yes")]),
    121: (date(2011, 1, 1), [("2025-02-01", "local", "opt_out", "child", "no")]),  # ignored
    122: (
        date(2011, 1, 1),
        [
            ("2023-06-01", "local", "opt_out", "guardian", ""),
            ("2025-03-01", "local", "consent", "self", "true"),  # own outranks the parent's
        ],
    ),
    123: (
        date(2011, 1, 1),
        [
            ("2025-03-01", "local", "opt_in", "self", "yes"),
            ("2025-06-01", "local", "opt_out", "parent", ""),  # later, but the child decides
        ],
    ),
    # 16+: their own; a parent's decision made while they were a child still holds
    130: (date(2008, 6, 1), [("2018-01-01", "ndoo", "opt_out", "parent", "")]),
    131: (date(2008, 6, 1), [("2025-01-01", "ndoo", "opt_out", "parent", "")]),  # at 16: void
    132: (
        date(2008, 6, 1),
        [
            ("2018-01-01", "ndoo", "opt_out", "parent", ""),
            ("2025-01-01", "ndoo", "opt_in", "self", ""),
        ],
    ),
    # no decision at all
    140: (date(2015, 6, 1), []),
    141: (date(1950, 6, 1), []),
}


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("people")
    omop = Omop()
    rows: list[tuple[Any, ...]] = []
    for pid, (born, decisions) in PEOPLE.items():
        omop.person(pid, born)
        rows += [(pid, *d) for d in decisions]
    rows.append((999, "2020-01-01", "local", "opt_out", "self", ""))  # not a person
    return write(omop, tmp / "omop"), register(tmp / "register.csv", rows)


def test_the_rules(people: tuple[Path, Path]) -> None:
    source, reg = people
    kept = included(source, ConsentPolicy(registers=(reg,)))
    # 123: the competent child opted in; the parent's later opt-out does not apply.
    assert set(PEOPLE) - kept == {101, 103, 104, 110, 120, 130}


def test_without_the_national_opt_out(people: tuple[Path, Path]) -> None:
    source, reg = people
    kept = included(source, ConsentPolicy(registers=(reg,), national_opt_out=False))
    assert set(PEOPLE) - kept == {104, 120}


def test_children_need_consent(people: tuple[Path, Path]) -> None:
    source, reg = people
    kept = included(source, ConsentPolicy(registers=(reg,), children_need_consent=True))
    # Under 16 at the reference date, included only with an applicable opt-in: 122 and 123.
    assert {p for p in kept if p in {110, 111, 120, 121, 122, 123, 140}} == {122, 123}
    assert {101, 103, 104, 110, 120, 130}.isdisjoint(kept)
    assert {102, 131, 132, 141} <= kept


def test_the_ages_are_configurable(people: tuple[Path, Path]) -> None:
    source, reg = people
    kept = included(
        source, ConsentPolicy(registers=(reg,), parent_decides_under=16, own_decision_from=18)
    )
    # 120's own decision at 14 no longer counts (competence only from 16); 131's parent
    # decided at 16, still a child now.
    assert 120 in kept
    assert 131 not in kept


def test_no_register_excludes_nobody(people: tuple[Path, Path]) -> None:
    source, _ = people
    assert included(source, ConsentPolicy()) == set(PEOPLE)


def test_the_report_counts_and_notes(people: tuple[Path, Path]) -> None:
    source, reg = people
    report = validate(
        DataSettings(omop=source, reference_date=REF, consent=ConsentPolicy(registers=(reg,))),
        [],
    )
    notes = [f for f in report.findings if f.where == "consent"]
    assert "6 persons excluded from every view" in notes[0].message
    # The decision about person 999, who is not in the CDM, is a warning on its file.
    (unmatched,) = [f for f in report.warnings if f.where == f"consent register {reg}"]
    assert unmatched.count == 1
    assert unmatched.detail == "e.g. 999"
    assert "match no person in the person table" in unmatched.message


def test_a_parquet_register_with_defaults_and_uk_dates(tmp_path: Path) -> None:
    omop = Omop()
    for pid in (1, 2, 3):
        omop.person(pid, date(1980, 1, 1))
    source = write(omop, tmp_path / "omop")
    reg = tmp_path / "optouts.parquet"
    pq.write_table(
        pa.table({"PERSON_ID": pa.array([1, 3], pa.int32()), "Date": ["01/02/2024", "2024-02-01"]}),
        reg,
    )
    assert included(source, ConsentPolicy(registers=(reg,))) == {2}


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([(1, "2024-01-01", "ndoo", "maybe", "self", "")], HEADER, "decision is not one of"),
        ([(1, "2024-01-01", "gp", "opt_out", "self", "")], HEADER, "source is not ndoo or local"),
        ([(1, "someday", "ndoo", "opt_out", "self", "")], HEADER, "date is missing"),
        ([("x", "2024-01-01", "ndoo", "opt_out", "self", "")], HEADER, "person_id is missing"),
        ([(1, "2024-01-01", "ndoo", "opt_out", "aunt", "")], HEADER, "decided_by is not"),
        ([(1, "2024-01-01", "ndoo", "opt_out", "self", "perhaps")], HEADER, "gillick"),
        ([(1,)], ("person_id",), "needs columns person_id and date"),
    ],
)
def test_a_bad_register_refuses_the_data(
    tmp_path: Path, rows: list[tuple[Any, ...]], header: tuple[str, ...], message: str
) -> None:
    source = write(example(), tmp_path / "omop")
    reg = register(tmp_path / "reg.csv", rows, header)
    with pytest.raises(DataError, match=message):
        OmopStore(source, [], reference_date=REF, consent=ConsentPolicy(registers=(reg,)))


def test_a_missing_register_fails_closed(tmp_path: Path) -> None:
    source = write(example(), tmp_path / "omop")
    report = validate(
        DataSettings(
            omop=source,
            reference_date=REF,
            consent=ConsentPolicy(registers=(tmp_path / "gone.csv",)),
        ),
        [],
    )
    assert report.errors[0].level is Level.ERROR
    assert "fails closed" in report.errors[0].message


def test_parse_consent(tmp_path: Path) -> None:
    policy = parse_consent(
        {"registers": "optouts.csv", "children_need_consent": True, "own_decision_from": 16},
        tmp_path,
        "node.toml",
    )
    assert policy.registers == (tmp_path / "optouts.csv",)
    assert policy.children_need_consent
    for bad in (
        {"registers": [1]},
        {"nope": 1},
        {"national_opt_out": "yes"},
        {"parent_decides_under": 17, "own_decision_from": 16},
        {"own_decision_from": 16.5},
    ):
        with pytest.raises(ConfigError):
            parse_consent(bad, tmp_path, "node.toml")
