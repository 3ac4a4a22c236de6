"""Pathway definitions (queries.pathway): the built-in library and parse errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from queries.errors import ConfigError
from queries.pathway import Entry, Pathway, builtin_pathways, load_pathways, parse_pathway

CLASSIC = {"asthma_children", "copd", "epilepsy", "alcohol_liver"}

GOOD = """\
name: heart_failure
title: Heart failure
description: Adults with heart failure.
conditions: [316139, 319835]
age_min: 18
age_max: 110
"""


def test_the_builtin_library_loads() -> None:
    library = builtin_pathways()
    assert set(library) >= CLASSIC
    for name, pathway in library.items():
        assert pathway.name == name
        assert pathway.title
        assert 0 <= pathway.age_min <= pathway.age_max
    asthma = library["asthma_children"]
    assert 317009 in asthma.conditions
    assert (asthma.age_min, asthma.age_max) == (0, 17)
    assert 255573 in library["copd"].conditions
    assert library["copd"].age_min == 18


def test_load_all_or_some() -> None:
    everything = load_pathways(None)
    assert {p.name for p in everything} == set(builtin_pathways())
    some = load_pathways(["copd", "asthma_children"])
    assert [p.name for p in some] == ["copd", "asthma_children"]


def test_an_unknown_pathway_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown pathway\(s\) \['cpod'\]") as info:
        load_pathways(["cpod"])
    assert "'copd'" in str(info.value)


def test_a_folder_adds_and_replaces_pathways(tmp_path: Path) -> None:
    (tmp_path / "heart_failure.yaml").write_text(GOOD)
    (tmp_path / "copd.yaml").write_text("name: copd\nconditions: [1, 2]\nage_min: 40\n")
    (tmp_path / "notes.txt").write_text("not a pathway")
    library = {p.name: p for p in load_pathways(None, tmp_path)}
    assert library["heart_failure"] == parse_pathway(GOOD, "x")
    assert library["copd"].conditions == (1, 2)
    assert library["copd"].age_min == 40
    assert set(library) >= CLASSIC


def test_parse_a_good_file() -> None:
    pathway = parse_pathway(GOOD, "heart_failure.yaml")
    assert isinstance(pathway, Pathway)
    assert pathway.name == "heart_failure"
    assert pathway.title == "Heart failure"
    assert pathway.conditions == (316139, 319835)
    assert (pathway.age_min, pathway.age_max) == (18, 110)


def test_title_and_ages_have_defaults() -> None:
    pathway = parse_pathway("name: x\nconditions: [5]\n", "x.yaml")
    assert pathway.title == "x"
    assert pathway.age_min == 0
    assert pathway.age_max >= 100


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("conditions: [1]\n", "name"),
        ("name: x\n", "conditions"),
        ("name: x\nconditions: []\n", "conditions"),
        ("name: x\nconditions: 317009\n", "conditions"),
        ("name: x\nconditions: [abc]\n", "conditions"),
        ("name: x\nconditions: [1]\nage_min: old\n", "age_min"),
        ("name: Bad-Name\nconditions: [1]\n", "Bad-Name"),
        ("name: x\nconditions: [1]\nage_min: 50\nage_max: 10\n", "age_min"),
        ("name: x\nconditions: [1]\nage_min: -1\n", "age_min"),
    ],
)
def test_parse_errors_name_the_file_and_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_pathway(text, "pathways/broken.yaml")
    message = str(info.value)
    assert message.startswith("pathways/broken.yaml"), message
    assert field in message, message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "", "42\n"])
def test_a_pathway_must_be_a_mapping(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^p\.yaml: a pathway must be a YAML mapping"):
        parse_pathway(text, "p.yaml")


@pytest.mark.parametrize("text", ["name: [unclosed\n", "name: x\n  conditions: [1]\n: :\n"])
def test_invalid_yaml_is_a_config_error_naming_the_file(text: str) -> None:
    # Regression: at c597ee4 yaml.YAMLError escaped parse_pathway unwrapped.
    with pytest.raises(ConfigError, match=r"^bad\.yaml"):
        parse_pathway(text, "bad.yaml")


@pytest.mark.parametrize("conditions", ['"317009"', "[1.7]", "[true]", "{317009: 1}", '["317009"]'])
def test_condition_ids_must_be_whole_numbers(conditions: str) -> None:
    # Regression: at c597ee4 conditions were read with int(c) for c in ..., so the string
    # "317009" became the concept set (3, 1, 7, 0, 0, 9), 1.7 became 1, true became 1 and a
    # mapping contributed its keys, all silently.
    with pytest.raises(ConfigError, match=r"^c\.yaml: .*(conditions|concept)"):
        parse_pathway(f"name: x\nconditions: {conditions}\n", "c.yaml")


def test_errors_in_an_extra_folder_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\n")
    with pytest.raises(ConfigError, match=re.escape(str(bad))):
        load_pathways(None, tmp_path)


# ---- entry events, windows and descendants ---------------------------------------------------


def test_the_library_covers_the_chc_pathways() -> None:
    library = builtin_pathways()
    assert set(library) == CLASSIC | {"urgent_care"}
    urgent = library["urgent_care"]
    assert urgent.entry is Entry.EMERGENCY_VISIT
    assert urgent.conditions == ()
    for pathway in library.values():
        assert pathway.window_days == 365
        assert pathway.descendants


def test_entry_window_and_descendants_parse() -> None:
    pathway = parse_pathway(
        "name: seizures\nconditions: [380378]\nentry: emergency_admission\n"
        "window_days: 90\ndescendants: false\n",
        "s.yaml",
    )
    assert pathway.entry is Entry.EMERGENCY_ADMISSION
    assert pathway.window_days == 90
    assert not pathway.descendants
    assert parse_pathway("name: x\nconditions: [1]\n", "x.yaml").entry is Entry.CONDITION


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: x\nconditions: [1]\nentry: admission\n", "entry"),
        ("name: x\nconditions: [1]\nwindow_days: 0\n", "window_days"),
        ("name: x\nconditions: [1]\nwindow_days: 1.5\n", "window_days"),
        ("name: x\nconditions: [1]\ndescendants: maybe\n", "descendants"),
        ("name: x\nconditions: [1]\nage_max: 130\n", "age_max"),
        ("name: x\nconditions: [1, 1]\n", "twice"),
        ("name: x\nconditions: [0]\n", "positive"),
        ("name: x\nconditions: []\nentry: emergency_admission\n", "conditions"),
        ("name: x\nconditions: [1]\nwindow: 365\n", "unknown key"),
        ("name: visits\nconditions: [1]\n", "built-in view"),
        ("name: persons\nconditions: [1]\n", "built-in view"),
    ],
)
def test_more_parse_errors(text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=r"^p\.yaml") as info:
        parse_pathway(text, "p.yaml")
    assert field in str(info.value)


def test_an_emergency_visit_pathway_may_have_no_concepts() -> None:
    pathway = parse_pathway("name: ed\nconditions: []\nentry: emergency_visit\n", "ed.yaml")
    assert pathway.conditions == ()
    assert parse_pathway("name: ed\nentry: emergency_visit\n", "ed.yaml").conditions == ()


def test_a_missing_extra_folder_and_repeated_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_pathways(None, tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="twice"):
        load_pathways(["copd", "copd"])
