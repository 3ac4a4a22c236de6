"""chc for analysts in Python: the one import path of the public API.

    from chc import Federation, Query, Measure, Filter, Statistic, Cohort
    from chc import ModelSpec, Covariate, Family  # models: Federation.fit (docs/models.md)

    fed = Federation.connect()  # CHC_HUB / CHC_IDENTITY, or a running `chc demo --keep-running`
    result = fed.query(parse_sql("SELECT sex, COUNT(*) FROM copd GROUP BY sex", rho=0.05))
    result.to_pandas()  # or to_arrow(), to_polars(); a notebook shows it as a table and a chart

`Federation` talks to the hub with the analyst's own identity (every call signed); queries
are frozen dataclasses (or `parse_sql` text), over a node's views or an ad hoc `Cohort`;
every error chc raises on purpose is a `ChcError` that also inherits the matching built-in
(a `QueryError` is a `ValueError`).
The names live in their packages by role (docs/architecture.md); this module only gathers
them, so that a notebook needs one import and a reorganisation of the packages breaks no
user's code. Nothing inside chc imports this module.
"""

from __future__ import annotations

from coordinator.analyst.client import (
    Federation,
    FitStoppedError,
    HubUnavailableError,
    NodeBudget,
)
from coordinator.learning.result import FitResult
from queries.cohort import COHORT_VIEW, Cohort
from queries.combine import POOLED
from queries.errors import (
    AuthenticationError,
    BudgetExceededError,
    ChcError,
    ConfigError,
    DataError,
    DeadlineExceededError,
    LedgerIntegrityError,
    PermissionDeniedError,
    QueryError,
    QuorumNotMetError,
)
from queries.model import Covariate, Family, ModelSpec
from queries.present import MissingExtraError, result_chart_svg
from queries.results import BudgetStatus, Explanation, FederatedResult, NodeExplain, NodeStatus
from queries.spec import Filter, Measure, Query, Statistic
from queries.sql import parse_sql

__all__ = [
    "COHORT_VIEW",
    "POOLED",
    "AuthenticationError",
    "BudgetExceededError",
    "BudgetStatus",
    "ChcError",
    "Cohort",
    "ConfigError",
    "Covariate",
    "DataError",
    "DeadlineExceededError",
    "Explanation",
    "Family",
    "FederatedResult",
    "Federation",
    "Filter",
    "FitResult",
    "FitStoppedError",
    "HubUnavailableError",
    "LedgerIntegrityError",
    "Measure",
    "MissingExtraError",
    "ModelSpec",
    "NodeBudget",
    "NodeExplain",
    "NodeStatus",
    "PermissionDeniedError",
    "Query",
    "QueryError",
    "QuorumNotMetError",
    "Statistic",
    "parse_sql",
    "result_chart_svg",
]
