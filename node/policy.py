"""Node configuration (node.toml) and the node's privacy budget."""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from node.access import AccessPolicy, parse_access
from node.consent import ConsentPolicy, parse_consent
from protocols.errors import ConfigError
from protocols.security import Identity, Role
from queries.results import ReleaseRules

# Budget periods: spend is summed over the period containing each entry's time (UTC). The UK
# public sector's financial year runs from 1 April to 31 March; "none" never resets.
PERIODS = ("financial-year", "calendar-year", "none")
BUDGET_KEYS = frozenset(
    {"total_rho", "max_rho_per_query", "delta", "period", "analyst_rho", "analysts"}
    | {"lifetime_rho", "analyst_lifetime_rho", "analysts_lifetime"}
)


def _positive(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
    )


def period_bounds(period: str, when: datetime) -> tuple[date | None, date | None]:
    """The budget period containing `when`: [start, end) dates, or (None, None) for "none"."""
    day = when.astimezone(UTC).date()
    if period == "financial-year":
        year = day.year if (day.month, day.day) >= (4, 1) else day.year - 1
        return date(year, 4, 1), date(year + 1, 4, 1)
    if period == "calendar-year":
        return date(day.year, 1, 1), date(day.year + 1, 1, 1)
    if period == "none":
        return None, None
    raise ConfigError(f"budget.period must be one of {list(PERIODS)}, got {period!r}")


# Refusals from one peer that reach the ledger per window (node.service.RefusalLimiter,
# docs/threat-model.md "Bounded work"): 30 a minute is far more than an analyst fixing a
# query or a hub relaying a busy federation's mistakes produce, and caps what an authenticated
# peer can make the node write by being refused at 31 entries (about 100 KB) a minute.
REFUSALS_PER_WINDOW = 30
REFUSAL_WINDOW_SECONDS = 60.0

# A node's name is a DNS label (RFC 1123) in lower case, with '_' allowed as `chc-node init`
# always has: it names the node's certificate, its default ledger file beside node.toml and
# every entry, so it can never be a path.
NODE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")


def check_node_name(name: object, source: str = "node.toml") -> str:
    """Return name if it is a valid node name, else raise a ConfigError saying the rule."""
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ConfigError(
            f"{source}: name {shown} is not a valid node name: use 1-63 lower-case letters, "
            "digits, '-' or '_', starting with a letter (the name of the node's certificate)"
        )
    return name


# A lifetime cap that node.toml does not set is this many times the matching period cap: five
# budget periods (five years by default), the usual longest term of a data-sharing agreement
# or a research approval, after which use of the data should be agreed again anyway. It keeps
# the guarantee over a node's life finite for nodes configured before lifetime caps existed.
LIFETIME_PERIODS = 5


def _cap_ok(value: object) -> bool:
    return value is None or _positive(value)


@dataclass(frozen=True)
class BudgetPolicy:
    """Caps on privacy spending, in zCDP rho, per budget period and over the node's life.

    A query is refused if its rho is above max_rho_per_query, if it would take the node's
    spend in the period above total_rho, or the analyst's spend above their cap (an entry
    in `analysts`, else analyst_rho; no per-analyst cap if both are absent), or if it would
    take the node's spend since the ledger began above lifetime_cap, or the analyst's above
    analyst_lifetime_cap. Lifetime caps that are None default to LIFETIME_PERIODS times the
    matching period cap (see resolved()).
    """

    total_rho: float = 10.0
    max_rho_per_query: float = 1.0
    delta: float = 1e-6
    period: str = "financial-year"
    analyst_rho: float | None = None
    analysts: tuple[tuple[str, float], ...] = ()
    lifetime_rho: float | None = None
    analyst_lifetime_rho: float | None = None
    analysts_lifetime: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("total_rho", "max_rho_per_query"):
            value = getattr(self, name)
            if not _positive(value):
                raise ConfigError(f"budget.{name} must be a positive number, got {value!r}")
        delta: object = self.delta
        if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
            raise ConfigError(f"budget.delta must be between 0 and 1, got {delta!r}")
        if self.period not in PERIODS:
            raise ConfigError(f"budget.period must be one of {list(PERIODS)}, got {self.period!r}")
        for name in ("analyst_rho", "lifetime_rho", "analyst_lifetime_rho"):
            value = getattr(self, name)
            if not _cap_ok(value):
                raise ConfigError(f"budget.{name} must be a positive number, got {value!r}")
        for table, caps in (
            ("analysts", self.analysts),
            ("analysts_lifetime", self.analysts_lifetime),
        ):
            for who, cap in caps:
                if not _positive(cap):
                    raise ConfigError(
                        f"budget.{table}.{who} must be a positive number, got {cap!r}"
                    )

    def analyst_cap(self, analyst: str) -> float | None:
        """The analyst's cap per period, or None if only the node total applies."""
        return dict(self.analysts).get(analyst, self.analyst_rho)

    @property
    def lifetime_cap(self) -> float:
        """The node's cap on rho released since its ledger began, in every period."""
        if self.lifetime_rho is not None:
            return self.lifetime_rho
        return LIFETIME_PERIODS * self.total_rho

    def default_analyst_lifetime_cap(self) -> float | None:
        """The lifetime cap of an analyst without one of their own, or None for none."""
        if self.analyst_lifetime_rho is not None:
            return self.analyst_lifetime_rho
        if self.analyst_rho is not None:
            return LIFETIME_PERIODS * self.analyst_rho
        return None

    def analyst_lifetime_cap(self, analyst: str) -> float | None:
        """The analyst's cap since the ledger began, or None if only the node's applies.

        An entry in analysts_lifetime, else analyst_lifetime_rho, else LIFETIME_PERIODS
        times the analyst's period cap (if they have one).
        """
        named = dict(self.analysts_lifetime).get(analyst)
        if named is not None:
            return named
        if self.analyst_lifetime_rho is not None:
            return self.analyst_lifetime_rho
        cap = self.analyst_cap(analyst)
        return LIFETIME_PERIODS * cap if cap is not None else None

    def resolved(self) -> BudgetPolicy:
        """The same caps with every default written out: what a policy entry records."""
        names = sorted({who for who, _ in self.analysts} | {w for w, _ in self.analysts_lifetime})
        lifetime: list[tuple[str, float]] = []
        for who in names:
            cap = self.analyst_lifetime_cap(who)
            if cap is not None:
                lifetime.append((who, float(cap)))
        default = self.default_analyst_lifetime_cap()
        return BudgetPolicy(
            total_rho=float(self.total_rho),
            max_rho_per_query=float(self.max_rho_per_query),
            delta=float(self.delta),
            period=self.period,
            analyst_rho=float(self.analyst_rho) if self.analyst_rho is not None else None,
            analysts=tuple(sorted((w, float(c)) for w, c in self.analysts)),
            lifetime_rho=float(self.lifetime_cap),
            analyst_lifetime_rho=float(default) if default is not None else None,
            analysts_lifetime=tuple(lifetime),
        )

    def period_of(self, when: datetime) -> tuple[date | None, date | None]:
        """The budget period containing `when`."""
        return period_bounds(self.period, when)


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
    access: AccessPolicy = field(default_factory=AccessPolicy)
    # The federation's certificate revocation list (default: crl.pem in the identity folder).
    crl: Path | None = None
    # The privacy ledger (default: <name>.ledger.sqlite beside node.toml, see
    # node.accounting.open_accountant) and its Ed25519 signing key (default: beside it).
    ledger: Path | None = None
    ledger_key: Path | None = None
    # Data layer (docs/data.md): the schema of a DuckDB source, the LSOA -> IMD lookup, a
    # folder of custodian pathway files, and opt-outs / children's consent ([consent]).
    omop_schema: str | None = None
    imd_lookup: Path | None = None
    pathways_dir: Path | None = None
    consent: ConsentPolicy = field(default_factory=ConsentPolicy)

    def __post_init__(self) -> None:
        check_node_name(self.name)


def check_node_certificate(config: NodeConfig, identity: Identity, source: str) -> None:
    """Refuse to run a node whose certificate is not a node's or names another node.

    Clients check a node's certificate name (its TLS server name), and auditors the name in
    its ledger, so a node answering under another name would be refused or misattributed.
    """
    if identity.role is not Role.NODE:
        raise ConfigError(
            f"{source}: {config.identity} holds a {identity.role.value} certificate, not a node "
            "one; issue one with `chc pki issue --role node`"
        )
    if identity.name != config.name:
        raise ConfigError(
            f"{source}: name {config.name!r} does not match the node's certificate, which is "
            f"issued to {identity.name!r} ({config.identity}); set name = {identity.name!r} or "
            f"issue a certificate for {config.name!r} (chc pki issue --role node --name "
            f"{config.name})"
        )


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
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"node config {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read node config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    base = path.parent
    known = {"name", "omop", "identity", "listen", "reference_date", "pathways", "budget"}
    known |= {"release", "access", "crl"}
    known |= {"ledger", "ledger_key"}
    known |= {"omop_schema", "imd_lookup", "pathways_dir", "consent"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("name", "omop", "identity"):
        if key not in data:
            raise ConfigError(f"{path}: missing required key {key!r}")
    budget_raw = data.get("budget", {})
    if not isinstance(budget_raw, dict):
        raise ConfigError(f"{path}: [budget] must be a table")
    unknown_budget = sorted(set(budget_raw) - BUDGET_KEYS)
    if unknown_budget:
        raise ConfigError(f"{path}: unknown [budget] key(s) {unknown_budget}")
    ref = data.get("reference_date", date(2025, 12, 31))
    if isinstance(ref, datetime) or not isinstance(ref, date):
        raise ConfigError(f"{path}: reference_date must be a TOML date such as 2025-12-31")
    pathways = data.get("pathways")
    if pathways is not None and not (
        isinstance(pathways, list) and all(isinstance(p, str) for p in pathways)
    ):
        raise ConfigError(f"{path}: pathways must be a list of pathway names")
    return NodeConfig(
        name=check_node_name(data["name"], str(path)),
        omop=_path(base, data["omop"], "omop"),
        identity=_path(base, data["identity"], "identity"),
        listen=str(data.get("listen", "127.0.0.1:50051")),
        reference_date=ref,
        pathways=tuple(pathways) if pathways is not None else None,
        budget=_budget_policy(budget_raw, path),
        release=_release_rules(data.get("release", {}), str(path)),
        access=parse_access(data.get("access"), str(path)),
        crl=_path(base, data["crl"], "crl") if "crl" in data else None,
        ledger=_path(base, data["ledger"], "ledger") if "ledger" in data else None,
        ledger_key=_path(base, data["ledger_key"], "ledger_key") if "ledger_key" in data else None,
        omop_schema=str(data["omop_schema"]) if "omop_schema" in data else None,
        imd_lookup=_path(base, data["imd_lookup"], "imd_lookup") if "imd_lookup" in data else None,
        pathways_dir=(
            _path(base, data["pathways_dir"], "pathways_dir") if "pathways_dir" in data else None
        ),
        consent=parse_consent(data.get("consent", {}), base, str(path)),
    )


def _budget_policy(raw: dict[str, Any], path: Path) -> BudgetPolicy:
    """[budget], with [budget.analysts] and [budget.analysts_lifetime] (name = rho) overrides."""
    values = dict(raw)
    analysts, lifetime = (_caps_table(values.pop(t, {}), t, path) for t in _TABLES)
    if "period" in values and not isinstance(values["period"], str):
        raise ConfigError(f"{path}: budget.period must be one of {list(PERIODS)}")
    return BudgetPolicy(**values, analysts=analysts, analysts_lifetime=lifetime)


_TABLES = ("analysts", "analysts_lifetime")


def _caps_table(raw: object, table: str, path: Path) -> tuple[tuple[str, float], ...]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [budget.{table}] must be a table of name = rho")
    return tuple(sorted(raw.items()))


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
