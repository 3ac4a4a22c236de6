"""Ad hoc cohorts: a cohort definition carried inside the analyst's signed query.

A pathway (queries/pathway.py) is a cohort the custodian installed as a YAML file; an ad hoc
cohort is the same definition (concept set, descendants, entry event, ages, window) written
by the analyst into the query, so that "persons with condition 40481087, by sex" needs no file
on any node:

    SELECT sex, COUNT(*) FROM cohort(conditions => [40481087], age_min => 18) GROUP BY sex

or, in a spec, `view: cohort` with a `cohort:` mapping. The query's view is then the reserved
name COHORT_VIEW, and the node builds a view exactly like a pathway's (one row per person,
the same columns) on demand. The rules are the pathways' own (`check_definition`), with the
analyst's error (QueryError, INVALID_ARGUMENT) instead of the custodian's. Whether a node
accepts a cohort at all is its custodian's policy (node.toml [cohorts]), checked by the node.
Concept ids are never a group-by domain: a query may select on them only through this
definition, and every person still appears at most once in the view.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from queries.errors import ConfigError, PermissionDeniedError, QueryError
from queries.pathway import MAX_AGE, Entry, Pathway, check_definition
from queries.spec import quote

# The reserved view name of an ad hoc cohort: no pathway may take it.
COHORT_VIEW = "cohort"
# Public limit on the concept ids one cohort lists (descendants are found by the node and do
# not count): OHDSI concept sets list tens, rarely hundreds; each id is a literal in SQL.
MAX_COHORT_CONCEPTS = 500
# The keys of a cohort mapping, in the order they are printed.
COHORT_KEYS = ("conditions", "descendants", "entry", "age_min", "age_max", "window_days")
_DEFAULTS: dict[str, object] = {
    "descendants": True,
    "entry": Entry.CONDITION.value,
    "age_min": 0,
    "age_max": MAX_AGE,
    "window_days": 365,
}


def _check_count(conditions: object) -> None:
    """Refuse too many concept ids before looking at any of them (bounded work)."""
    if isinstance(conditions, tuple | list) and len(conditions) > MAX_COHORT_CONCEPTS:
        raise QueryError(
            f"cohort conditions list {len(conditions)} concept ids, more than the limit of "
            f"{MAX_COHORT_CONCEPTS}; list the ancestors and use descendants => true instead"
        )


@dataclass(frozen=True)
class Cohort:
    """Who is in an ad hoc cohort, and the window its outcomes are counted over."""

    conditions: tuple[int, ...]
    descendants: bool = True
    entry: Entry = Entry.CONDITION
    age_min: int = 0
    age_max: int = MAX_AGE
    window_days: int = 365

    def __post_init__(self) -> None:
        _check_count(self.conditions)
        if isinstance(self.conditions, list):
            object.__setattr__(self, "conditions", tuple(self.conditions))
        if isinstance(self.entry, str) and self.entry in {e.value for e in Entry}:
            object.__setattr__(self, "entry", Entry(self.entry))
        check_definition(
            "cohort",
            conditions=self.conditions,
            entry=self.entry,
            age_min=self.age_min,
            age_max=self.age_max,
            window_days=self.window_days,
            descendants=self.descendants,
            error=QueryError,
        )
        # A concept set has no order: sorted, equal cohorts sign, cache and print alike.
        object.__setattr__(self, "conditions", tuple(sorted(self.conditions)))

    def to_dict(self) -> dict[str, Any]:
        """Every field, always: the canonical form of a cohort (its cache key too)."""
        return {
            "conditions": list(self.conditions),
            "descendants": self.descendants,
            "entry": self.entry.value,
            "age_min": self.age_min,
            "age_max": self.age_max,
            "window_days": self.window_days,
        }

    def non_defaults(self) -> dict[str, Any]:
        """The conditions and the fields that differ from their defaults (for SQL)."""
        full = self.to_dict()
        return {k: v for k, v in full.items() if k == "conditions" or v != _DEFAULTS[k]}

    def key(self) -> str:
        """A digest of the canonical definition: equal cohorts, equal keys."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def pathway(self, name: str, title: str = "Ad hoc cohort") -> Pathway:
        """The same definition as a Pathway named `name`, for the views and the catalog."""
        return Pathway(
            name=name,
            title=title,
            description="The analyst's cohort definition, built by the node on demand.",
            conditions=self.conditions,
            age_min=self.age_min,
            age_max=self.age_max,
            entry=self.entry,
            window_days=self.window_days,
            descendants=self.descendants,
        )


def cohort_from_dict(data: object) -> Cohort:
    """A Cohort from a parsed spec's `cohort` mapping; errors name the field."""
    if not isinstance(data, Mapping):
        raise QueryError(
            "field 'cohort' must be a mapping such as {conditions: [40481087], age_min: 18}"
        )
    unknown = sorted(quote(k, 60) for k in set(data) - set(COHORT_KEYS))
    if unknown:
        raise QueryError(
            f"unknown field(s) [{', '.join(unknown[:10])}] in cohort; known: {list(COHORT_KEYS)}"
        )
    if "conditions" not in data:
        raise QueryError("cohort has no 'conditions'; list condition concept ids, e.g. [40481087]")
    conditions = data["conditions"]
    if not isinstance(conditions, list):
        raise QueryError("cohort.conditions must be a list of OMOP condition concept ids")
    _check_count(conditions)
    entry = data.get("entry", _DEFAULTS["entry"])
    if entry not in {e.value for e in Entry}:
        raise QueryError(
            f"cohort.entry must be one of {[e.value for e in Entry]}, got {quote(entry, 40)}"
        )
    values: dict[str, Any] = {}
    for key in ("age_min", "age_max", "window_days"):
        value = data.get(key, _DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, int):
            raise QueryError(f"cohort.{key} must be a whole number, got {quote(value, 40)}")
        values[key] = value
    descendants = data.get("descendants", True)
    if not isinstance(descendants, bool):
        raise QueryError(f"cohort.descendants must be true or false, got {quote(descendants, 40)}")
    return Cohort(
        conditions=tuple(conditions),
        descendants=descendants,
        entry=Entry(entry),
        **values,
    )


def check_view(view: str, cohort: Cohort | None) -> None:
    """A query names the reserved cohort view if and only if it carries a cohort."""
    if cohort is not None and not isinstance(cohort, Cohort):
        raise QueryError(f"cohort must be a Cohort, got {type(cohort).__name__}")
    if cohort is not None and view != COHORT_VIEW:
        raise QueryError(
            f"a query with a cohort definition queries view {COHORT_VIEW!r}, not {view!r}: "
            f"write FROM {COHORT_VIEW}(conditions => [...]), or drop the cohort"
        )
    if cohort is None and view == COHORT_VIEW:
        raise QueryError(
            f"view {COHORT_VIEW!r} is the analyst's ad hoc cohort: define it, e.g. FROM "
            f"{COHORT_VIEW}(conditions => [40481087], age_min => 18), or in a spec "
            "`cohort: {conditions: [40481087]}`"
        )


class Allow(enum.StrEnum):
    """Which ad hoc cohorts a node answers."""

    NONE = "none"
    LISTED = "listed"
    ANY = "any"


@dataclass(frozen=True)
class CohortPolicy:
    """Which ad hoc cohorts a node answers: its custodian's [cohorts] table in node.toml,
    enforced at the node and published in Describe so analysts know before they ask."""

    allow: Allow = Allow.NONE
    concepts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.allow is Allow.LISTED and not self.concepts:
            raise ConfigError('cohorts.allow = "listed" needs a non-empty cohorts.concepts list')
        if self.allow is not Allow.LISTED and self.concepts:
            raise ConfigError('cohorts.concepts only goes with cohorts.allow = "listed"')

    @property
    def enabled(self) -> bool:
        """True if any ad hoc cohort may be answered (so the views keep what they need)."""
        return self.allow is not Allow.NONE

    def check(self, cohort: Cohort) -> None:
        """Raise PermissionDeniedError unless this node's custodian allows the cohort."""
        if self.allow is Allow.NONE:
            raise PermissionDeniedError(
                "this node does not answer ad hoc cohorts (its custodian has not allowed them "
                "in node.toml [cohorts]); query one of its pathway views, or ask the custodian"
            )
        if self.allow is Allow.LISTED:
            unlisted = sorted(set(cohort.conditions) - set(self.concepts))
            if unlisted:
                shown = ", ".join(str(c) for c in unlisted[:10])
                more = f" and {len(unlisted) - 10} more" if len(unlisted) > 10 else ""
                raise PermissionDeniedError(
                    f"this node's custodian allows ad hoc cohorts on listed concepts only, and "
                    f"concept id(s) {shown}{more} are not listed; the listed ones: "
                    f"{list(self.concepts)[:20]}"
                )
