"""Result value types shared by nodes, the hub and analysts' clients."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import pyarrow as pa

from queries.cohort import CohortPolicy
from queries.errors import ConfigError
from queries.schema import Catalog


@dataclass(frozen=True)
class BudgetStatus:
    """A node's privacy budget in zCDP rho, as the node reports it."""

    rho_total: float
    rho_spent: float
    max_rho_per_query: float
    delta: float

    @property
    def rho_remaining(self) -> float:
        """What is left to spend."""
        return max(0.0, self.rho_total - self.rho_spent)


@dataclass(frozen=True)
class NoiseInfo:
    """How a release was protected: enough to compute intervals downstream."""

    mechanism: str
    scale: float
    variance: float
    sensitivity: float


@dataclass(frozen=True)
class MeasureNoise:
    """The noise and the share of rho of one released measure."""

    measure: str
    statistic: str
    noise: NoiseInfo
    rho: float


@dataclass(frozen=True)
class ReleaseRules:
    """Suppress counts below `suppress_below`; round counts to a multiple of `round_to`."""

    suppress_below: int = 8
    round_to: int = 5

    def __post_init__(self) -> None:
        if self.suppress_below < 0:
            raise ConfigError("release.suppress_below must be 0 or more")
        if self.round_to < 1:
            raise ConfigError("release.round_to must be 1 or more (1: no rounding)")

    def node_rounds(self, noise_sd: float) -> bool:
        """Whether a node rounds a count released with this noise sd (one rule for node and hub).

        Rounding to a multiple of round_to hides a count's last digit; noise whose standard
        deviation is at least round_to already does, and rounding on top of it would only
        bend the intervals (the error of rounding a noisy count is not noise: it depends on
        the count). So a node rounds only counts whose noise is finer than the rounding.
        """
        return self.round_to > 1 and noise_sd < self.round_to

    def strictest(self, other: ReleaseRules) -> ReleaseRules:
        """The rules that satisfy both (used when a node is stricter than the hub)."""
        return ReleaseRules(
            suppress_below=max(self.suppress_below, other.suppress_below),
            round_to=max(self.round_to, other.round_to),
        )


# The long table a node releases: group columns (strings), then these. One row per group and
# component (and bin); `lower`/`upper` are the component's public clamp bounds (null for
# counts); a null `value` is a cell the node withheld under its disclosure rules.
_RELEASE_FIELDS = (
    ("component", pa.string()),
    ("bin", pa.int32()),
    ("bin_lower", pa.float64()),
    ("bin_upper", pa.float64()),
    ("lower", pa.float64()),
    ("upper", pa.float64()),
    ("value", pa.float64()),
)
RELEASE_COLUMNS = tuple(name for name, _ in _RELEASE_FIELDS)


def release_schema(group_by: Sequence[str]) -> pa.Schema:
    """Schema of the long release table a node sends: groups, then RELEASE_COLUMNS."""
    return pa.schema([(col, pa.string()) for col in group_by] + list(_RELEASE_FIELDS))


@dataclass(frozen=True)
class NodeRelease:
    """One node's DP answer to one query."""

    query_id: str
    table: pa.Table  # group columns, then one int64 column per measure
    noise: NoiseInfo
    rho_charged: float
    epsilon: float
    budget: BudgetStatus
    measures: tuple[MeasureNoise, ...] = ()
    rules: ReleaseRules | None = None
    ledger_sequence: int = 0

    def variance(self, measure: str) -> float:
        """Noise variance of one measure's values (the first measure's if unlisted)."""
        for m in self.measures:
            if m.measure == measure:
                return m.noise.variance
        return self.noise.variance


class NodeStatus(enum.StrEnum):
    """What happened at a node for one federated query."""

    OK = "ok"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    TIMED_OUT = "timed_out"
    ERROR = "error"


@dataclass(frozen=True)
class NodeOutcome:
    """A node's status in a federated result, with its cost and noise."""

    node: str
    status: NodeStatus
    message: str = ""
    rho_charged: float = 0.0
    noise_variance: float = 0.0
    budget: BudgetStatus | None = None
    latency_ms: float = 0.0
    measures: tuple[MeasureNoise, ...] = ()
    # The node's receipt: its query id and the ledger entry of the charge.
    node_query_id: str = ""
    ledger_sequence: int = 0
    # The node re-sent the release it kept for this envelope (a retry): rho_charged was
    # charged when it first answered, not again.
    resent: bool = False
    # The node answered neither the query nor the hub's re-send for its kept release in
    # time: whether it charged is not known (at most the query's rho). rho_charged is then 0
    # but is no receipt; re-sending the envelope later (Federation.resend) tells.
    charge_unknown: bool = False


@dataclass(frozen=True)
class ShareNoise:
    """One component's distributed noise share under secure aggregation (public)."""

    component: str
    length: int  # values in the component's vector
    upscale: int  # the public power of ten every node scales its integers by
    share_scale: float  # each node's discrete Gaussian sigma, in scaled units
    unit: float  # natural units per integer unit
    rho: float  # the component's share of the query's rho, charged at every node
    rho_threshold: float  # its guarantee if only the threshold's nodes are honest
    rho_all_honest: float  # its guarantee if every node is


@dataclass(frozen=True)
class SecureAggregation:
    """How a secure aggregate's noise was shared, and what it guarantees.

    k = nodes took part; the shares assume threshold (t) of them honest. rho_threshold is the
    release's guarantee if only t are honest (at most what each node charged), rho_all_honest
    if all k are.
    """

    nodes: int
    threshold: int
    rho_threshold: float
    rho_all_honest: float
    components: tuple[ShareNoise, ...] = ()
    round: tuple[str, ...] = ()

    def pooled_variance(self, component: str) -> float:
        """An upper bound on the pooled sum's noise variance per value, natural units."""
        for c in self.components:
            if c.component == component:
                return float(self.nodes * c.share_scale**2 * (c.unit / c.upscale) ** 2)
        raise KeyError(component)


@dataclass(frozen=True)
class NodeExplain:
    """What a query would cost and how noisy it would be at one node (nothing spent)."""

    node: str
    status: NodeStatus
    message: str = ""
    plan: str = ""
    measures: tuple[MeasureNoise, ...] = ()
    rho: float = 0.0
    epsilon: float = 0.0
    cells: int = 0
    budget: BudgetStatus | None = None
    # A pooled_only query: the pooled sum's noise under secure aggregation, per component
    # (measures give the same components with each node's full noise), and its guarantee.
    secure_measures: tuple[MeasureNoise, ...] = ()
    secure_aggregation: SecureAggregation | None = None


@dataclass(frozen=True)
class Explanation(Sequence[NodeExplain]):
    """What every node said to an Explain: a sequence of NodeExplain, one per node.

    Iterate, index or len() it like the list it used to be; to_arrow()/to_pandas() give one
    row per node and measure, and notebooks show it as a table (queries/present/).
    """

    nodes: tuple[NodeExplain, ...] = ()

    @overload
    def __getitem__(self, index: int) -> NodeExplain: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[NodeExplain]: ...

    def __getitem__(self, index: int | slice) -> NodeExplain | Sequence[NodeExplain]:
        return self.nodes[index]

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[NodeExplain]:
        return iter(self.nodes)

    def to_arrow(self) -> pa.Table:
        """One row per node and measure: status, cells, rho, epsilon, noise sd, budget left."""
        from queries.present.frames import explanation_arrow

        return explanation_arrow(self)

    def to_pandas(self) -> Any:
        """to_arrow() as a pandas DataFrame (needs the notebook extra)."""
        from queries.present.frames import to_pandas

        return to_pandas(self.to_arrow())

    def to_polars(self) -> Any:
        """to_arrow() as a polars DataFrame (needs the notebook extra)."""
        from queries.present.frames import to_polars

        return to_polars(self.to_arrow())

    def _repr_html_(self) -> str:
        from queries.present.html import explanation_html

        return explanation_html(self)


@dataclass(frozen=True)
class FederatedResult:
    """The hub's combined answer: per-region and pooled rows, and every node's outcome."""

    query_id: str
    # Columns: region, group columns..., measure, statistic, bin_lower, bin_upper, estimate,
    # std_error, ci_low, ci_high, n, approximate, partial, suppressed (queries/combine.py).
    table: pa.Table
    nodes: tuple[NodeOutcome, ...]
    partial: bool
    # Set for a secure aggregate (a pooled_only query): the table has pooled rows only.
    secure_aggregation: SecureAggregation | None = None

    def to_arrow(self) -> pa.Table:
        """One row per region, group and measure, with estimate, interval, flags and status.

        The table's columns, then node_status and rho_spent (queries/present/frames.py).
        """
        from queries.present.frames import result_arrow

        return result_arrow(self)

    def to_pandas(self) -> Any:
        """to_arrow() as a pandas DataFrame (needs the notebook extra)."""
        from queries.present.frames import to_pandas

        return to_pandas(self.to_arrow())

    def to_polars(self) -> Any:
        """to_arrow() as a polars DataFrame (needs the notebook extra)."""
        from queries.present.frames import to_polars

        return to_polars(self.to_arrow())

    def chart_svg(self, measure: str | None = None, *, width: int = 720) -> str:
        """The result as an SVG chart: per-region bars with 95% interval whiskers."""
        from queries.present.chart import result_chart_svg

        return result_chart_svg(self, measure=measure, width=width)

    def _repr_html_(self) -> str:
        from queries.present.html import result_html

        return result_html(self)


@dataclass(frozen=True)
class NodeDescription:
    """What a node publishes about itself: name, protocol, catalog, budget, and which ad hoc
    cohorts it answers."""

    node: str
    protocol_version: str
    catalog: Catalog
    budget: BudgetStatus
    cohorts: CohortPolicy = field(default_factory=CohortPolicy)
