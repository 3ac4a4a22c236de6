"""Secure aggregates in words and numbers: the guarantee line and the noise an analyst trades.

A pooled_only query is released by secure aggregation (docs/secure-aggregation.md): each node
adds a share of the noise, so the pooled sum carries about central DP's noise rather than k
nodes' full noise. Explain gives both per component; compare_noise sets them side by side so
an analyst can choose. Shared by the CLI (coordinator/analyst/report.py) and the notebook
HTML and frames here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from queries.results import MeasureNoise, NodeExplain, NodeStatus, SecureAggregation


def _rho(x: float) -> str:
    return f"{x:.4g}"


def guarantee_text(g: SecureAggregation, *, ran: bool = True) -> str:
    """One line: over how many nodes, the threshold, both guarantees, and what the hub sees.

    ran: the query ran (a result); False for an Explain, which ran nothing.
    """
    k, t = g.nodes, g.threshold
    if t >= k:
        shares = "shares assume both honest" if k == 2 else f"shares assume all {k} honest"
        rho = f"rho {_rho(g.rho_threshold)}"
    else:
        shares = f"shares assume {t} honest"
        rho = (
            f"rho {_rho(g.rho_threshold)} if only {t} are honest, "
            f"{_rho(g.rho_all_honest)} if all are"
        )
    saw = "saw" if ran else "would see"
    return (
        f"secure aggregation over {k} nodes ({shares}): {rho}; "
        f"the hub {saw} only the masked vectors and their sum"
    )


@dataclass(frozen=True)
class NoiseComparison:
    """One component's pooled noise sd with per-node noise and with secure aggregation."""

    component: str
    statistic: str
    nodes: int  # the nodes whose per-node noise is summed (those that can run the query)
    per_node_sd: float  # sqrt of the sum over those nodes of each one's noise variance
    secure_sd: float  # sqrt of the pooled sum's noise variance under secure aggregation

    @property
    def ratio(self) -> float:
        """How many times wider the per-node noise is (about sqrt(k) when t = k)."""
        return self.per_node_sd / self.secure_sd if self.secure_sd > 0 else math.inf


def _variance(measures: Iterable[MeasureNoise], component: str) -> float | None:
    for m in measures:
        if m.measure == component and m.noise.variance >= 0:
            return m.noise.variance
    return None


def secure_guarantee(explains: Iterable[NodeExplain]) -> SecureAggregation | None:
    """The guarantee the nodes that can run a pooled_only query give (the first one's)."""
    return next((e.secure_aggregation for e in explains if e.secure_aggregation is not None), None)


def compare_noise(explains: Iterable[NodeExplain]) -> list[NoiseComparison]:
    """Per component of a pooled_only query, both pooled noise sds; [] for any other query.

    Only nodes that can run the query count. Nodes compute the secure-aggregation noise from
    the same public facts, so they agree; the largest is taken should one differ.
    """
    ok = [e for e in explains if e.status is NodeStatus.OK]
    components: dict[str, str] = {}
    for e in ok:
        for m in e.secure_measures:
            components.setdefault(m.measure, m.statistic)
    out = []
    for component, statistic in components.items():
        per_node = [v for e in ok if (v := _variance(e.measures, component)) is not None]
        secure = [v for e in ok if (v := _variance(e.secure_measures, component)) is not None]
        if not per_node or not secure:
            continue
        out.append(
            NoiseComparison(
                component=component,
                statistic=statistic,
                nodes=len(per_node),
                per_node_sd=math.sqrt(math.fsum(per_node)),
                secure_sd=math.sqrt(max(secure)),
            )
        )
    return out
