"""Policy entries in the ledger: the record format, what loosens a policy, and a change of it.

A node records its whole budget policy (protocols.budget.policy.BudgetPolicy, every default
written out) in a signed "policy" entry of its ledger whenever it opens the ledger with a
policy different from the last one recorded. The caps in force for every later entry are
that entry's, for the node and for the verifier (coordinator/audit/) alike, so both use the
functions here to write and read the entry and to judge a change. Kept apart from the spend
sums (protocols/budget/tally.py) and the cap checks (protocols/budget/rules.py), which never
look at how a policy came to be in force.

The rule (docs/ledger.md, "Policy changes"): no cap may rise (per query, per period, over
the node's life; the node's, the default analyst's and every named analyst's; nor delta,
which would weaken every quoted (epsilon, delta)), and the period may change only to
"none" (its one period is the node's life) or when every lifetime cap is at most the
matching period cap (then no period cap can bind, so period boundaries do not matter).
Anything else is a loosening, which a node accepts only with a custodian's reason, recorded
in the entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocols.budget.policy import LIFETIME_PERIODS, BudgetPolicy, as_number
from queries.errors import ConfigError
from queries.numbers import show, show_apart

POLICY_RECORD = "chc.ledger.policy"
_NUMBERS = ("total_rho", "max_rho_per_query", "delta", "lifetime_rho")
_OPTIONAL = ("analyst_rho", "analyst_lifetime_rho")
_TABLES = ("analysts", "analysts_lifetime")
POLICY_FIELDS = frozenset({*_NUMBERS, *_OPTIONAL, *_TABLES, "period"})
OVERRIDE_FLAG = "--allow-policy-loosening"


# ---- the record -----------------------------------------------------------------------------


def policy_record(policy: BudgetPolicy) -> dict[str, Any]:
    """The policy as a policy entry holds it: JSON, with every default written out."""
    p = policy.resolved()
    return {
        "total_rho": p.total_rho,
        "max_rho_per_query": p.max_rho_per_query,
        "delta": p.delta,
        "period": p.period,
        "analyst_rho": p.analyst_rho,
        "analysts": dict(p.analysts),
        "lifetime_rho": p.lifetime_rho,
        "analyst_lifetime_rho": p.analyst_lifetime_rho,
        "analysts_lifetime": dict(p.analysts_lifetime),
    }


def policy_from_record(raw: object) -> BudgetPolicy:
    """Inverse of policy_record; ValueError (a ConfigError) for anything else."""
    if not isinstance(raw, dict) or set(raw) != POLICY_FIELDS:
        keys = sorted(raw) if isinstance(raw, dict) else raw
        raise ConfigError(f"a policy must have exactly the fields {sorted(POLICY_FIELDS)}: {keys}")
    values: dict[str, Any] = {}
    for name in _NUMBERS:
        values[name] = as_number(raw[name])
        if values[name] is None:
            raise ConfigError(f"policy {name} must be a number, got {raw[name]!r}")
    for name in _OPTIONAL:
        values[name] = None if raw[name] is None else as_number(raw[name])
        if raw[name] is not None and values[name] is None:
            raise ConfigError(f"policy {name} must be a number or null, got {raw[name]!r}")
    for name in _TABLES:
        table = raw[name]
        if not isinstance(table, dict):
            raise ConfigError(f"policy {name} must map analysts to numbers, got {table!r}")
        caps: list[tuple[str, float]] = []
        for who, value in sorted(table.items()):
            cap = as_number(value)
            if cap is None:
                raise ConfigError(f"policy {name}.{who} must be a number, got {value!r}")
            caps.append((str(who), cap))
        values[name] = tuple(caps)
    if not isinstance(raw["period"], str):
        raise ConfigError(f"policy period must be a string, got {raw['period']!r}")
    policy = BudgetPolicy(period=raw["period"], **values)
    if policy_record(policy) != raw:
        raise ConfigError(
            "the policy's lifetime caps are not the ones its period caps imply (a policy "
            "entry writes out every default)"
        )
    return policy


# ---- what loosens a policy --------------------------------------------------------------


def _show(value: float | str | None) -> str:
    if value is None:
        return "no cap"
    return f'"{value}"' if isinstance(value, str) else show(value)


@dataclass(frozen=True)
class Loosening:
    """One way a new policy is looser than the one before: a cap that rises, or the period."""

    field: str  # the node.toml key, e.g. "budget.total_rho" or "budget.analysts.alice"
    old: float | str | None  # None: no cap
    new: float | str | None

    def __str__(self) -> str:
        old, new = _show(self.old), _show(self.new)
        if isinstance(self.old, float | int) and isinstance(self.new, float | int):
            old, new = show_apart(self.old, self.new)  # a cap that rises by 1e-7 reads so
        return f"{self.field} from {old} to {new}"

    def to_json(self) -> dict[str, Any]:
        """As a policy entry records it."""
        return {"field": self.field, "from": self.old, "to": self.new}


def _rises(old: float | None, new: float | None) -> bool:
    # None is no cap at all: removing a cap is a rise, adding one never is.
    return old is not None and (new is None or new > old)


def _named(*policies: BudgetPolicy) -> list[str]:
    names: set[str] = set()
    for p in policies:
        names |= {who for who, _ in (*p.analysts, *p.analysts_lifetime)}
    return sorted(names)


def lifetime_bounds_periods(policy: BudgetPolicy) -> bool:
    """Whether every lifetime cap is at most its period cap, so no period cap can ever bind."""
    p = policy.resolved()
    if p.lifetime_cap > p.total_rho:
        return False
    caps = [(p.analyst_rho, p.default_analyst_lifetime_cap())]
    caps += [(p.analyst_cap(who), p.analyst_lifetime_cap(who)) for who in _named(p)]
    for period_cap, lifetime_cap in caps:
        if period_cap is None:
            continue
        bound = p.lifetime_cap if lifetime_cap is None else min(lifetime_cap, p.lifetime_cap)
        if bound > period_cap:
            return False
    return True


def loosenings(previous: BudgetPolicy, new: BudgetPolicy) -> tuple[Loosening, ...]:
    """Every way `new` is looser than `previous` (empty if it only tightens or is the same)."""
    p, n = previous.resolved(), new.resolved()
    caps: list[tuple[str, float | None, float | None]] = [
        ("budget.total_rho", p.total_rho, n.total_rho),
        ("budget.max_rho_per_query", p.max_rho_per_query, n.max_rho_per_query),
        ("budget.delta", p.delta, n.delta),
        ("budget.lifetime_rho", p.lifetime_cap, n.lifetime_cap),
        ("budget.analyst_rho", p.analyst_rho, n.analyst_rho),
        (
            "budget.analyst_lifetime_rho",
            p.default_analyst_lifetime_cap(),
            n.default_analyst_lifetime_cap(),
        ),
    ]
    names = _named(p, n)
    caps += [(f"budget.analysts.{w}", p.analyst_cap(w), n.analyst_cap(w)) for w in names]
    caps += [
        (f"budget.analysts_lifetime.{w}", p.analyst_lifetime_cap(w), n.analyst_lifetime_cap(w))
        for w in names
    ]
    found = [Loosening(name, old, new) for name, old, new in caps if _rises(old, new)]
    if p.period != n.period and n.period != "none" and not lifetime_bounds_periods(n):
        found.append(Loosening("budget.period", p.period, n.period))
    return tuple(found)


def _hint(item: Loosening, configured: BudgetPolicy) -> str:
    """Why a cap the custodian did not set moved: its default follows a period cap."""
    name = item.field.removeprefix("budget.")
    unset = (
        (name == "lifetime_rho" and configured.lifetime_rho is None)
        or (name == "analyst_lifetime_rho" and configured.analyst_lifetime_rho is None)
        or (
            name.startswith("analysts_lifetime.")
            and name.partition(".")[2] not in dict(configured.analysts_lifetime)
            and configured.analyst_lifetime_rho is None
        )
    )
    if not unset:
        return str(item)
    keep = f"; set {item.field} = {_show(item.old)} to keep it" if item.old is not None else ""
    return (
        f"{item} (not set in node.toml, so {LIFETIME_PERIODS} times the matching period cap{keep})"
    )


def summary(policy: BudgetPolicy) -> str:
    """The policy in one line, for people."""
    p = policy.resolved()
    per = "over the node's life" if p.period == "none" else f"per {p.period}"
    text = (
        f"node {show(p.total_rho)} {per} and {show(p.lifetime_cap)} over its life, at most "
        f"{show(p.max_rho_per_query)} per query"
    )
    if p.analyst_rho is not None or p.analyst_lifetime_rho is not None:
        text += (
            f"; each analyst {_show(p.analyst_rho)} per period and "
            f"{_show(p.analyst_lifetime_rho)} over the life"
        )
    named = _named(p)
    if named:
        text += f"; own caps for {', '.join(named)}"
    return f"{text} (zCDP rho; delta {show(p.delta)})"


# ---- a change of policy -------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyChange:
    """A policy entry: the policy from now on, the one it replaces, and how it loosens it."""

    policy: BudgetPolicy  # resolved
    previous: BudgetPolicy | None  # None: the ledger's first policy entry
    previous_entry: int | None  # the sequence number of the policy entry replaced
    loosened: tuple[Loosening, ...] = ()
    override: str | None = None  # the custodian's reason, required if loosened

    def fields(self) -> dict[str, Any]:
        """The policy entry's own fields (the ledger adds sequence, time, node, prev_hash)."""
        return {
            "record": POLICY_RECORD,
            "policy": policy_record(self.policy),
            "previous": policy_record(self.previous) if self.previous is not None else None,
            "previous_entry": self.previous_entry,
            "loosened": [item.to_json() for item in self.loosened],
            "override": {"reason": self.override} if self.override is not None else None,
        }

    def describe(self) -> str:
        """One line for the node's log and `chc-node check`."""
        if self.previous is None:
            return "is the ledger's first budget policy"
        if not self.loosened:
            return f"tightens the policy of entry {self.previous_entry}"
        items = "; ".join(str(item) for item in self.loosened)
        return (
            f"LOOSENS the policy of entry {self.previous_entry} ({items}), by the custodian's "
            f"override: {self.override!r}"
        )


def read_change(body: dict[str, Any]) -> PolicyChange:
    """A policy entry's fields back as a PolicyChange; ValueError if they are malformed."""
    previous_raw, previous_entry = body["previous"], body["previous_entry"]
    if (previous_raw is None) != (previous_entry is None):
        raise ConfigError("previous and previous_entry must both be set or both be null")
    if previous_entry is not None and (
        isinstance(previous_entry, bool) or not isinstance(previous_entry, int)
    ):
        raise ConfigError(f"previous_entry must be a sequence number, got {previous_entry!r}")
    loosened_raw, override_raw = body["loosened"], body["override"]
    if not isinstance(loosened_raw, list) or not all(
        isinstance(item, dict) and set(item) == {"field", "from", "to"} for item in loosened_raw
    ):
        raise ConfigError("loosened must be a list of {field, from, to}")
    override: str | None = None
    if override_raw is not None:
        if not isinstance(override_raw, dict) or not isinstance(override_raw.get("reason"), str):
            raise ConfigError("override must be null or {reason: text}")
        override = override_raw["reason"]
    return PolicyChange(
        policy=policy_from_record(body["policy"]),
        previous=policy_from_record(previous_raw) if previous_raw is not None else None,
        previous_entry=previous_entry,
        loosened=tuple(Loosening(str(i["field"]), i["from"], i["to"]) for i in loosened_raw),
        override=override,
    )


def plan_change(
    configured: BudgetPolicy,
    recorded: BudgetPolicy | None,
    recorded_entry: int | None,
    *,
    node: str,
    override: str | None = None,
) -> PolicyChange | None:
    """The policy entry to append for node.toml's policy, or None if it is the one in force.

    Raises ConfigError, naming every cap that would rise, if the configured policy loosens
    the recorded one and no override reason is given.
    """
    if override is not None and not override.strip():
        raise ConfigError(
            f"{OVERRIDE_FLAG} needs a reason (who approved the loosening and why); it is "
            "recorded in the ledger for auditors"
        )
    policy = configured.resolved()
    if recorded is not None and policy_record(recorded) == policy_record(policy):
        return None
    if recorded is None:
        return PolicyChange(policy=policy, previous=None, previous_entry=None)
    loosened = loosenings(recorded, policy)
    if loosened and override is None:
        items = "; ".join(_hint(item, configured) for item in loosened)
        raise ConfigError(
            f"node {node}: the [budget] in node.toml loosens the budget policy recorded in its "
            f"ledger (policy entry {recorded_entry}): {items}. Caps may only be lowered, and "
            'the period changed only to "none" or while every lifetime cap is at most its '
            'period cap (docs/ledger.md, "Policy changes"). Put the recorded values back in '
            "node.toml or, if the data custodian has approved the loosening, start the node "
            f'with `chc-node serve --config node.toml {OVERRIDE_FLAG} "REASON"`: the reason '
            "is recorded in the signed policy entry, where auditors see it"
        )
    return PolicyChange(
        policy=policy,
        previous=recorded.resolved(),
        previous_entry=recorded_entry,
        loosened=loosened,
        override=override.strip() if loosened and override is not None else None,
    )
