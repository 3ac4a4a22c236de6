"""docs/configuration.md documents exactly the keys node.toml's and hub.toml's loaders accept.

The key sets are imported from the loaders themselves (the sets they refuse unknown keys
against), so a key added to a loader without a row in the reference fails here, and so does
a row for a key no loader accepts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from coordinator.hub.registry import (
    HUB_KEYS,
    HUB_LEARNING_KEYS,
    HUB_NODE_KEYS,
    HUB_RELEASE_KEYS,
    load_hub_config,
)
from node.access import ACCESS_KEYS
from node.config import (
    BUDGET_KEYS,
    CARE_SITE_KEYS,
    HUB_LINK_KEYS,
    LEARNING_KEYS,
    MODEL_KEYS,
    NODE_KEYS,
    RELEASE_KEYS,
    load_config,
)
from node.data.cohorts import COHORT_KEYS
from node.data.consent import _KEYS as CONSENT_KEYS
from queries.errors import ConfigError

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

# Sections whose rows are free-form names (an analyst's name = a cap or a list of views).
FREE_FORM = frozenset({"`[budget.analysts]` and `[budget.analysts_lifetime]`"})
FREE_FORM |= {"`[access.analyst_views]`"}

# (file, section heading) -> the keys its loader accepts there.
EXPECTED: dict[tuple[str, str], frozenset[str]] = {
    ("node.toml", "Top-level keys"): NODE_KEYS,
    ("node.toml", "`[budget]`"): BUDGET_KEYS,
    ("node.toml", "`[release]`"): RELEASE_KEYS,
    ("node.toml", "`[access]`"): ACCESS_KEYS,
    ("node.toml", "`[consent]`"): CONSENT_KEYS,
    ("node.toml", "`[cohorts]`"): COHORT_KEYS,
    ("node.toml", "`[models]`"): MODEL_KEYS,
    ("node.toml", "`[care_sites]`"): CARE_SITE_KEYS,
    ("node.toml", "`[learning]`"): LEARNING_KEYS,
    ("node.toml", "`[hub]`"): HUB_LINK_KEYS,
    ("hub.toml", "Top-level keys"): HUB_KEYS,
    ("hub.toml", "`[[nodes]]`"): HUB_NODE_KEYS,
    ("hub.toml", "`[release]`"): HUB_RELEASE_KEYS,
    ("hub.toml", "`[learning]` (hub)"): HUB_LEARNING_KEYS,
}

_ROW_KEY = re.compile(r"^\|\s*`([^`]+)`")


def documented_sections(text: str) -> dict[tuple[str, str], list[str]]:
    """The first-column keys of every table, by (## file, ### section)."""
    sections: dict[tuple[str, str], list[str]] = {}
    file = section = None
    for line in text.splitlines():
        if line.startswith("## "):
            file, section = line[3:].strip(), None
        elif line.startswith("### "):
            section = line[4:].strip()
            if file is not None:
                sections[(file, section)] = []
        elif file is not None and section is not None and (m := _ROW_KEY.match(line)):
            sections[(file, section)].append(m.group(1))
    return sections


SECTIONS = documented_sections(DOC.read_text(encoding="utf-8"))


def test_every_section_is_known() -> None:
    """A new section needs an entry in EXPECTED (or FREE_FORM) here, naming its key set."""
    unmapped = [s for s in SECTIONS if s not in EXPECTED and s[1] not in FREE_FORM]
    assert unmapped == [], f"map these sections of {DOC.name} to their loader's key set"
    missing = [s for s in EXPECTED if s not in SECTIONS]
    assert missing == [], f"{DOC.name} lacks these sections"


@pytest.mark.parametrize("where", sorted(EXPECTED), ids=lambda w: f"{w[0]}:{w[1]}")
def test_documented_keys_are_the_accepted_keys(where: tuple[str, str]) -> None:
    """Every accepted key has a row, and every row is an accepted key (no repeats)."""
    rows = SECTIONS.get(where, [])
    accepted = EXPECTED[where]
    assert sorted(accepted - set(rows)) == [], f"undocumented in {where}"
    assert sorted(set(rows) - accepted) == [], f"documented in {where} but not accepted"
    assert len(rows) == len(set(rows)), f"a key is documented twice in {where}"


def test_free_form_sections_document_a_placeholder() -> None:
    """Per-analyst tables show their one row shape, `<analyst name>`."""
    for (_, section), rows in SECTIONS.items():
        if section in FREE_FORM:
            assert rows, section
            assert all(r.startswith("<analyst name>") for r in rows), section


def test_the_imported_sets_are_what_the_loaders_check(tmp_path: Path) -> None:
    """The loaders refuse an unknown key listing exactly these sets (so none is re-listed)."""
    node = tmp_path / "node.toml"
    node.write_text('name = "nwc"\nomop = "o"\nidentity = "i"\nbogus = 1\n')
    with pytest.raises(ConfigError) as caught:
        load_config(node)
    assert f"known: {sorted(NODE_KEYS)}" in str(caught.value)
    hub = tmp_path / "hub.toml"
    hub.write_text('identity = "i"\nbogus = 1\n[[nodes]]\nname = "a"\naddress = "b:1"\n')
    with pytest.raises(ConfigError) as caught:
        load_hub_config(hub)
    assert f"known: {sorted(HUB_KEYS)}" in str(caught.value)


def test_hub_refuses_a_misspelt_node_key(tmp_path: Path) -> None:
    """A typo in a [[nodes]] entry is refused, naming the entry and the key."""
    hub = tmp_path / "hub.toml"
    hub.write_text('identity = "i"\n[[nodes]]\nname = "a"\naddress = "b:1"\ntilte = "A"\n')
    with pytest.raises(ConfigError, match=r"nodes\[0\] has unknown key\(s\) \['tilte'\]"):
        load_hub_config(hub)
