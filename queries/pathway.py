"""Pathway (cohort) definitions, read from the custodian-reviewable YAML files in pathways/.

A pathway says who is in a cohort (a concept set, an entry event and age limits) and over
which window its outcomes are counted. The node turns each served pathway into one view with
one row per person (node/data/views.py); the catalog describes it (node/data/catalog.py).
A file looks like this, and every key but name and conditions has a default:

    name: copd                    # the view's name: lower-case letters, digits, '_'
    title: COPD
    description: Adults with COPD and their unplanned (emergency) admissions.
    conditions: [255573]          # OMOP condition_concept_ids (the concept set)
    descendants: true             # also match descendants, if the node has concept_ancestor
    entry: condition              # condition | emergency_admission | emergency_visit
    age_min: 18                   # age at the reference date (or at death), inclusive
    age_max: 120
    window_days: 365              # outcomes are counted over this many days up to the
                                  # reference date; members must be alive when it opens
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeGuard

import yaml

from queries.errors import ChcError, ConfigError, QueryError
from queries.spec import check_identifier, quote

MAX_AGE = 120
MAX_WINDOW_DAYS = 3_660
# "cohort" is the view of an analyst's ad hoc cohort (queries/cohort.py).
RESERVED_NAMES = frozenset({"persons", "visits", "cohort"})


class Entry(enum.StrEnum):
    """The event that puts a person on a pathway."""

    # Any condition record in the concept set, in any position, on or before the reference date.
    CONDITION = "condition"
    # An emergency admission in the window with a concept-set condition recorded on the stay.
    EMERGENCY_ADMISSION = "emergency_admission"
    # An emergency department visit in the window (with a concept-set condition recorded on
    # it, if the pathway lists any).
    EMERGENCY_VISIT = "emergency_visit"


_KEYS = frozenset(
    {
        "name",
        "title",
        "description",
        "conditions",
        "descendants",
        "entry",
        "age_min",
        "age_max",
        "window_days",
    }
)


# Concept ids are staged as BIGINT (OMOP's are 32-bit; local ones may be larger).
MAX_CONCEPT_ID = 2**63 - 1


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_definition(
    what: str,
    *,
    conditions: object,
    entry: object,
    age_min: object,
    age_max: object,
    window_days: object,
    descendants: object,
    error: type[ChcError],
) -> None:
    """Raise `error` naming `what` unless the parts of a cohort definition are valid.

    Shared by custodians' pathways (ConfigError) and analysts' ad hoc cohorts (QueryError),
    so that both obey the same rules and the views built from them are alike.
    """
    if not isinstance(entry, Entry):
        raise error(f"{what}: entry must be one of {[e.value for e in Entry]}")
    if not isinstance(conditions, tuple):
        raise error(f"{what}: conditions must be a list of OMOP concept ids")
    if not conditions and entry is not Entry.EMERGENCY_VISIT:
        raise error(
            f"{what} lists no condition concept ids; only an "
            "emergency_visit pathway may leave `conditions` empty"
        )
    if any(not _whole(c) or not 0 < c <= MAX_CONCEPT_ID for c in conditions):
        raise error(f"{what}: concept ids must be positive integers")
    if len(set(conditions)) != len(conditions):
        twice = sorted({c for c in conditions if conditions.count(c) > 1})
        raise error(f"{what} lists a concept id twice ({quote(twice)})")
    if not isinstance(descendants, bool):
        raise error(f"{what}: descendants must be true or false")
    if not (_whole(age_min) and _whole(age_max) and 0 <= age_min <= age_max <= MAX_AGE):
        raise error(f"{what}: need 0 <= age_min <= age_max <= {MAX_AGE} (whole years)")
    if not (_whole(window_days) and 1 <= window_days <= MAX_WINDOW_DAYS):
        raise error(f"{what}: window_days must be between 1 and {MAX_WINDOW_DAYS}")


@dataclass(frozen=True)
class Pathway:
    """A cohort: who joins (concept set, entry event, ages) and the outcome window."""

    name: str
    title: str
    description: str
    conditions: tuple[int, ...]
    age_min: int = 0
    age_max: int = MAX_AGE
    entry: Entry = Entry.CONDITION
    window_days: int = 365
    descendants: bool = True

    def __post_init__(self) -> None:
        try:
            check_identifier(self.name, "pathway name")
        except QueryError as exc:
            raise ConfigError(str(exc)) from None
        if self.name in RESERVED_NAMES:
            raise ConfigError(f"pathway name {self.name!r} is taken by a built-in view")
        check_definition(
            f"pathway {self.name!r}",
            conditions=self.conditions,
            entry=self.entry,
            age_min=self.age_min,
            age_max=self.age_max,
            window_days=self.window_days,
            descendants=self.descendants,
            error=ConfigError,
        )


def _int(data: dict[str, object], key: str, default: int, source: str) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{source}: {key} must be a whole number, got {value!r}")
    return value


def parse_pathway(text: str, source: str) -> Pathway:
    """Parse one pathway YAML document; errors name the file and field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a pathway must be a YAML mapping")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    if "name" not in data:
        raise ConfigError(f"{source}: missing field 'name'")
    conditions = data.get("conditions", [])
    if not isinstance(conditions, list):
        raise ConfigError(f"{source}: conditions must be a list of OMOP concept ids")
    if any(isinstance(c, bool) or not isinstance(c, int) for c in conditions):
        raise ConfigError(f"{source}: conditions must be whole numbers (OMOP concept ids)")
    entry = data.get("entry", Entry.CONDITION.value)
    if entry not in {e.value for e in Entry}:
        raise ConfigError(
            f"{source}: entry must be one of {[e.value for e in Entry]}, got {entry!r}"
        )
    descendants = data.get("descendants", True)
    if not isinstance(descendants, bool):
        raise ConfigError(f"{source}: descendants must be true or false")
    try:
        return Pathway(
            name=str(data["name"]),
            title=str(data.get("title", data["name"])),
            description=str(data.get("description", "")).strip(),
            conditions=tuple(conditions),
            age_min=_int(data, "age_min", 0, source),
            age_max=_int(data, "age_max", MAX_AGE, source),
            entry=Entry(entry),
            window_days=_int(data, "window_days", 365, source),
            descendants=descendants,
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def builtin_pathways() -> dict[str, Pathway]:
    """The pathway library shipped with chc, by name."""
    found: dict[str, Pathway] = {}
    for entry in sorted(resources.files("queries").joinpath("pathways").iterdir(), key=str):
        if entry.name.endswith(".yaml"):
            pathway = parse_pathway(entry.read_text(encoding="utf-8"), entry.name)
            found[pathway.name] = pathway
    return found


def load_pathways(names: list[str] | None, extra_dir: Path | None = None) -> list[Pathway]:
    """The pathways a node serves: named ones from the library and an optional folder.

    A file in extra_dir replaces a built-in pathway of the same name, so a custodian can
    review and adapt a definition without editing the package.
    """
    library = builtin_pathways()
    if extra_dir is not None:
        if not extra_dir.is_dir():
            raise ConfigError(f"pathways folder {extra_dir} does not exist")
        for path in sorted(extra_dir.glob("*.yaml")):
            pathway = parse_pathway(path.read_text(encoding="utf-8"), str(path))
            library[pathway.name] = pathway
    if names is None:
        return list(library.values())
    unknown = [n for n in names if n not in library]
    if unknown:
        raise ConfigError(f"unknown pathway(s) {unknown}; available: {sorted(library)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"pathways {names} name one pathway twice")
    return [library[n] for n in names]
