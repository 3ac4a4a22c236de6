"""A compare_by fit's units: each level's totals summed over the nodes, then disclosure rules.

Each node releases, per level of the compared column (e.g. care_site), the outcome's sum at
its design check and the sum of y - mu at the expected step. A level can be at several
nodes (a trust two custodians both declare, or `other`): its totals are the sums over them,
and their noise variances add, as the noises are independent.

The disclosure rules (the hub's, made stricter by any node's) then apply as to a query's
cells: a unit whose noisy outcome sum (its observed events) is below `suppress_below` is
shown without figures. No total of the units is published with them (the hub leaves the
per-node totals out of a compare_by fit), so no suppressed unit can be had by subtraction
and no complementary suppression is needed. The decision is on noisy values only, so it
costs no budget and reveals nothing the release did not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from queries.errors import DataError
from queries.fitted import UnitTotals
from queries.model import StepRelease
from queries.results import ReleaseRules


@dataclass
class _Sums:
    outcome: float = 0.0
    outcome_variance: float = 0.0
    residual: float = 0.0
    residual_variance: float = 0.0
    nodes: list[str] = field(default_factory=list)


def unit_totals(
    design: Sequence[StepRelease], expected: Sequence[StepRelease], rules: ReleaseRules
) -> tuple[UnitTotals, ...]:
    """Per level, in the nodes' order: the totals over nodes, small units suppressed."""
    by_node = {r.node: r for r in expected}
    sums: dict[str, _Sums] = {}
    for d in design:
        e = by_node.get(d.node)
        if e is None:
            raise DataError(f"node {d.node} released no expected step")
        if d.units != e.units:
            raise DataError(
                f"node {d.node} named units {list(e.units)[:8]} at the expected step but "
                f"{list(d.units)[:8]} at the design check"
            )
        outcome, residual = d.vectors["unit_outcome"], e.vectors["unit_residual"]
        for i, level in enumerate(d.units):
            s = sums.setdefault(level, _Sums())
            s.outcome += outcome[i]
            s.outcome_variance += d.variances["unit_outcome"]
            s.residual += residual[i]
            s.residual_variance += e.variances["unit_residual"]
            s.nodes.append(d.node)
    return tuple(_shown(level, s, rules.suppress_below) for level, s in sums.items())


def _shown(level: str, s: _Sums, threshold: int) -> UnitTotals:
    if s.outcome < threshold:
        nan = math.nan
        return UnitTotals(
            unit=level,
            outcome_sum=nan,
            outcome_variance=nan,
            residual_sum=nan,
            residual_variance=nan,
            nodes=tuple(s.nodes),
            suppressed=True,
            reason=f"suppressed: fewer than {threshold} observed events (a noisy count)",
        )
    return UnitTotals(
        unit=level,
        outcome_sum=s.outcome,
        outcome_variance=s.outcome_variance,
        residual_sum=s.residual,
        residual_variance=s.residual_variance,
        nodes=tuple(s.nodes),
    )
