"""Node configuration (node.toml) and the node's privacy budget."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError
from queries.results import ReleaseRules


@dataclass(frozen=True)
class BudgetPolicy:
    """Caps on privacy spending, in zCDP rho."""

    total_rho: float = 10.0
    max_rho_per_query: float = 1.0
    delta: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("total_rho", "max_rho_per_query"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"budget.{name} must be a positive number, got {value!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"budget.delta must be between 0 and 1, got {self.delta!r}")


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to start, from node.toml."""

    name: str
    omop: Path
    identity: Path
    listen: str = "127.0.0.1:50051"
    reference_date: date = date(2025, 12, 31)
    pathways: tuple[str, ...] | None = None
    budget: BudgetPolicy = BudgetPolicy()
    release: ReleaseRules = field(default_factory=ReleaseRules)


def _path(base: Path, raw: object, field: str) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{field} must be a path string")
    path = Path(raw)
    return path if path.is_absolute() else (base / path)


def load_config(path: Path) -> NodeConfig:
    """Read node.toml; relative paths are taken from the file's folder."""
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"node config {path} does not exist; create it with `chc-node init`"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    base = path.parent
    known = {"name", "omop", "identity", "listen", "reference_date", "pathways", "budget"}
    known |= {"release"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("name", "omop", "identity"):
        if key not in data:
            raise ConfigError(f"{path}: missing required key {key!r}")
    budget_raw = data.get("budget", {})
    if not isinstance(budget_raw, dict):
        raise ConfigError(f"{path}: [budget] must be a table")
    unknown_budget = sorted(set(budget_raw) - {"total_rho", "max_rho_per_query", "delta"})
    if unknown_budget:
        raise ConfigError(f"{path}: unknown [budget] key(s) {unknown_budget}")
    ref = data.get("reference_date", date(2025, 12, 31))
    if not isinstance(ref, date):
        raise ConfigError(f"{path}: reference_date must be a TOML date such as 2025-12-31")
    pathways = data.get("pathways")
    if pathways is not None and not (
        isinstance(pathways, list) and all(isinstance(p, str) for p in pathways)
    ):
        raise ConfigError(f"{path}: pathways must be a list of pathway names")
    return NodeConfig(
        name=str(data["name"]),
        omop=_path(base, data["omop"], "omop"),
        identity=_path(base, data["identity"], "identity"),
        listen=str(data.get("listen", "127.0.0.1:50051")),
        reference_date=ref,
        pathways=tuple(pathways) if pathways is not None else None,
        budget=BudgetPolicy(**budget_raw),
        release=_release_rules(data.get("release", {}), str(path)),
    )


def _release_rules(raw: object, source: str) -> ReleaseRules:
    """[release] suppress_below / round_to, the node's disclosure rules."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [release] must be a table")
    unknown = sorted(set(raw) - {"suppress_below", "round_to"})
    if unknown:
        raise ConfigError(f"{source}: unknown [release] key(s) {unknown}")
    values = {k: v for k, v in raw.items()}
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{source}: release.{k} must be a whole number")
    return ReleaseRules(**values)
