"""Opt-outs and children's consent (node.consent), and the proof that they hold beneath views.

The proof: for persons chosen to touch every view (cohort members, heavy users, a child whose
parent opted out), the node's views over the data with that person plus their opt-out are
identical, row for row, to the views over the data without them. Identical multisets of rows
give identical exact aggregates of every kind; the test also runs the query engine's exact
path over every public column of every view to show it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from coordinator.local import synth
from node import engine
from node.data.catalog import build_catalog
from node.data.consent import ConsentPolicy, parse_consent
from node.data.findings import Level
from node.data.store import OmopStore
from node.data.validate import DataSettings, validate
from queries import plan
from queries.errors import ConfigError, DataError
from queries.pathway import load_pathways
from queries.schema import Catalog, ColumnType, ViewSpec
from queries.spec import Measure, Query, Statistic
from tests.unit.omop_testdata import REF, Omop, example, write

PATHWAYS = load_pathways(None)
HEADER = ("person_id", "date", "source", "decision", "decided_by", "gillick_competent")


def register(path: Path, rows: list[tuple[Any, ...]], header: tuple[str, ...] = HEADER) -> Path:
    lines = [",".join(header)] + [",".join("" if v is None else str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def included(source: Path, policy: ConsentPolicy) -> set[int]:
    store = OmopStore(source, [], reference_date=REF, threads=1, consent=policy)
    try:
        return {r["person_id"] for r in store.query("SELECT person_id FROM persons").to_pylist()}
    finally:
        store.close()


# ---- the rules ------------------------------------------------------------------------------

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


# ---- person_ids read exactly --------------------------------------------------------------

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


# ---- the proof ------------------------------------------------------------------------------


def snapshot(store: OmopStore) -> dict[str, Counter[tuple[Any, ...]]]:
    """Every view as a multiset of rows."""
    return {
        name: Counter(tuple(r.values()) for r in store.query(f'SELECT * FROM "{name}"').to_pylist())  # noqa: S608
        for name in store.tables()
    }


def queries_over(view: ViewSpec) -> list[Query]:
    """Counts by every public column and pair of columns, and sums of every bounded column."""
    categories = [c.name for c in view.columns if c.type is ColumnType.CATEGORY]
    numbers = [c.name for c in view.columns if c.bounded]
    out = [Query(view=view.name, rho=1.0)]
    out += [Query(view=view.name, rho=1.0, group_by=(c,)) for c in categories]
    out += [
        Query(view=view.name, rho=1.0, group_by=p)
        for p in itertools.combinations(categories[:4], 2)
    ]
    out += [
        Query(
            view=view.name,
            rho=1.0,
            group_by=(c,),
            measures=tuple(Measure(Statistic.SUM, f"s{i}", n) for i, n in enumerate(numbers)),
        )
        for c in categories[:2]
        if numbers
    ]
    out += [
        Query(view=view.name, rho=1.0, measures=(Measure(Statistic.COUNT_ROWS, "rows"),)),
    ]
    return out


def exact_aggregates(store: OmopStore, catalog: Catalog) -> dict[str, dict[str, list[int]]]:
    results: dict[str, dict[str, list[int]]] = {}
    for view in catalog.views:
        for query in queries_over(view):
            compiled = plan.compile_query(query, catalog)
            results[compiled.describe()] = engine.exact_values(compiled, store)
    return results


def without(folder: Path, out: Path, pid: int) -> Path:
    """A copy of a Parquet OMOP folder without any row about person pid."""
    out.mkdir(parents=True)
    for f in folder.glob("*.parquet"):
        table = pq.read_table(f)
        if "person_id" in table.column_names:
            table = table.filter(pc.not_equal(table.column("person_id"), pid))
        pq.write_table(table, out / f.name)
    return out


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("region") / "nwc"
    synth.generate_region(synth.region_by_slug("nwc"), 4_000, folder, seed=3)
    return folder


def chosen_persons(folder: Path) -> dict[str, int]:
    """One person per view (and the heaviest user of visits), from the exact views."""
    store = OmopStore(folder, PATHWAYS, reference_date=REF, threads=1)
    try:
        picks = {
            view: int(
                store.query(
                    f'SELECT person_id FROM "{view}" ORDER BY admissions DESC, '  # noqa: S608
                    "ed_attendances DESC, person_id LIMIT 1"
                ).to_pylist()[0]["person_id"]
            )
            for view in ("asthma_children", "copd", "epilepsy", "alcohol_liver", "urgent_care")
        }
        picks["visits"] = int(
            store.query(
                "SELECT person_id FROM visits GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 1"
            ).to_pylist()[0]["person_id"]
        )
    finally:
        store.close()
    return picks


def test_an_opted_out_person_changes_no_exact_aggregate_of_any_view(
    region: Path, tmp_path: Path
) -> None:
    lookup = region / synth.LOOKUP_FILE
    catalog = build_catalog(PATHWAYS, reference_date=REF)
    picks = chosen_persons(region)
    assert len(set(picks.values())) >= 4  # the picks are spread over several persons
    views_of: dict[int, list[str]] = {}
    for what, pid in picks.items():
        views_of.setdefault(pid, []).append(what)
    everyone = OmopStore(region, PATHWAYS, reference_date=REF, threads=1, imd_lookup=lookup)
    full = snapshot(everyone)
    everyone.close()
    for pid, views in sorted(views_of.items()):
        # The person's own opt-out, and a parent's: whichever applies at their age.
        reg = register(
            tmp_path / f"optout-{pid}.csv",
            [
                (pid, "2024-01-01", "ndoo", "", "", ""),
                (pid, "2024-01-01", "ndoo", "", "parent", ""),
            ],
        )
        with_optout = OmopStore(
            region,
            PATHWAYS,
            reference_date=REF,
            threads=1,
            imd_lookup=lookup,
            consent=ConsentPolicy(registers=(reg,)),
        )
        removed = OmopStore(
            without(region, tmp_path / f"without-{pid}", pid),
            PATHWAYS,
            reference_date=REF,
            threads=1,
            imd_lookup=lookup,
        )
        try:
            opted_out = snapshot(with_optout)
            assert opted_out == snapshot(removed), views
            assert exact_aggregates(with_optout, catalog) == exact_aggregates(removed, catalog)
            # ...and the person did count before opting out, so the test has teeth.
            for view in views:
                assert full[view] != opted_out[view], view
        finally:
            with_optout.close()
            removed.close()


def test_a_child_opted_out_by_a_parent_changes_no_view(region: Path, tmp_path: Path) -> None:
    store = OmopStore(region, PATHWAYS, reference_date=REF, threads=1)
    try:
        child = int(
            store.query(
                "SELECT person_id FROM asthma_children WHERE age < 13 ORDER BY person_id LIMIT 1"
            ).to_pylist()[0]["person_id"]
        )
    finally:
        store.close()
    reg = register(
        tmp_path / "parent.csv", [(child, "2025-06-01", "local", "opt_out", "parent", "")]
    )
    with_optout = OmopStore(
        region, PATHWAYS, reference_date=REF, threads=1, consent=ConsentPolicy(registers=(reg,))
    )
    removed = OmopStore(
        without(region, tmp_path / "without", child), PATHWAYS, reference_date=REF, threads=1
    )
    try:
        assert snapshot(with_optout) == snapshot(removed)
    finally:
        with_optout.close()
        removed.close()
