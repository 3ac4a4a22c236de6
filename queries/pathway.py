"""Pathway (cohort) definitions, read from the custodian-reviewable YAML files in pathways/."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from protocols.errors import ConfigError
from queries.spec import check_identifier


@dataclass(frozen=True)
class Pathway:
    """A cohort: persons with a condition in a concept set, within an age range."""

    name: str
    title: str
    description: str
    conditions: tuple[int, ...]
    age_min: int
    age_max: int

    def __post_init__(self) -> None:
        check_identifier(self.name, "pathway name")
        if not self.conditions:
            raise ConfigError(f"pathway {self.name!r} lists no condition concept ids")
        if not 0 <= self.age_min <= self.age_max:
            raise ConfigError(f"pathway {self.name!r}: need 0 <= age_min <= age_max")


def parse_pathway(text: str, source: str) -> Pathway:
    """Parse one pathway YAML document; errors name the file and field."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a pathway must be a YAML mapping")
    try:
        return Pathway(
            name=str(data["name"]),
            title=str(data.get("title", data["name"])),
            description=str(data.get("description", "")),
            conditions=tuple(int(c) for c in data["conditions"]),
            age_min=int(data.get("age_min", 0)),
            age_max=int(data.get("age_max", 120)),
        )
    except KeyError as exc:
        raise ConfigError(f"{source}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
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
    """The pathways a node serves: named ones from the library and an optional folder."""
    library = builtin_pathways()
    if extra_dir is not None:
        for path in sorted(extra_dir.glob("*.yaml")):
            pathway = parse_pathway(path.read_text(encoding="utf-8"), str(path))
            library[pathway.name] = pathway
    if names is None:
        return list(library.values())
    unknown = [n for n in names if n not in library]
    if unknown:
        raise ConfigError(f"unknown pathway(s) {unknown}; available: {sorted(library)}")
    return [library[n] for n in names]
