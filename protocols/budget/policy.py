"""The budget policy a node enforces and its auditors check: caps in zCDP rho and periods.

A contract between the node that writes the ledger and the auditor who verifies it, so it
lives here rather than in node/ (the hub and auditors never import node/).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime

from queries.errors import ConfigError

# Budget periods: spend is summed over the period containing each entry's time (UTC). The UK
# public sector's financial year runs from 1 April to 31 March; "none" never resets.
PERIODS = ("financial-year", "calendar-year", "none")


def _positive(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
    )


def as_number(value: object) -> float | None:
    """A JSON number as a float, or None for anything else (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


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
