"""A federated model: what an analyst asks the federation to fit, and what a step releases.

A model is a frozen spec like every query (Tumult style), signed by the analyst in one
envelope whose operation is `fit` (docs/models.md). Its design, the columns of the
coefficient vector, follows from the spec, the view's public catalog and the list of
regions alone, so the hub and every node agree on it without seeing any data.

A fit is a fixed sequence of steps, each charged at every node before it is released:

- step 0, the design check: the number of persons n, the number of persons at each
  indicator column of the design (one-hot levels, region) and the outcome's sum. A node
  refuses the rest of the fit (its custodian's [models] policy) when a noisy count says a
  level is too small or the design has too many parameters for n: a decision taken on a DP
  release, so the refusal itself is private.
- steps 1..K, Newton (IRLS) steps: at the coefficients b the hub sends, with
  eta = x'b (+ offset) and mu the inverse link of eta, the gradient sum_i x_i (y_i - mu_i)
  and the upper triangle (row-major) of sum_i w_i x_i x_i', where w is mu (1 - mu) for
  binomial, mu for Poisson and 1 for Gaussian. A Gaussian model needs one step (b is
  ignored): X'X, X'y and y'y, from which the hub solves least squares.

A model trained by gradient descent (`solver = "gradient"`, docs/training.md: over Flower,
for models trained in rounds) holds a fifth of the persons out (by a hash of their
identifier), fits on the rest in rounds that each release the gradient and the training
loss, and ends with an evaluation step: histograms of the held-out persons' scores, by
outcome, from which the hub has a held-out AUC.

A model that compares units (`compare_by`, a public category such as care_site) adds to the
design check the outcome's sum at each level of that column, and takes one more step after the
Newton steps, the expected step: at the final coefficients, the sum of y - mu at each level,
from which the hub has each unit's expected count E = O - sum (y - mu) for indirect
standardisation (coordinator/learning/compare.py). The unit is not in the design.

Every design entry is in [0, 1]: the intercept is 1, a categorical covariate is one-hot
against its reference level (the first level of its public domain unless chosen), a numeric
covariate is clamped to its public bounds and scaled to [0, 1], and a region effect is the
indicator of each node but the first. Outcomes are clamped too, so every released statistic
has a sensitivity derived from public bounds only (queries/sensitivity.py).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from queries.errors import QueryError
from queries.numbers import show_apart
from queries.schema import ColumnType, ViewSpec
from queries.spec import MAX_FILTERS, RHO_RANGE, Filter, check_identifier, quote

if TYPE_CHECKING:
    from queries.cohort import Cohort

MODEL_VERSION = "chc.model/1"
# Public limits: a design is small (DataSHIELD's GLMs rarely pass 30 parameters), and each
# Newton step costs a round trip and a share of the budget.
MAX_COVARIATES = 20
MAX_PARAMETERS = 100
MAX_ITERATIONS = 25
DEFAULT_ITERATIONS = 6
# A small neural network (solver "gradient", hidden > 0): one hidden layer of tanh units.
MAX_HIDDEN = 32
MAX_CLIP = 1000.0
# Gradient-descent rounds (solver "gradient"): each is a round trip over Flower.
SOLVERS = ("newton", "gradient")
MAX_ROUNDS = 100
DEFAULT_ROUNDS = 10
INTERCEPT = "(intercept)"
# A model's rho may go far above a query's (RHO_RANGE): "equals the pooled fit as the budget
# grows" is checked at rho ~1e18, where the noise is below the fit's own rounding. No node's
# cap comes near that; the caps, not this range, are what protect the data.
MODEL_RHO_RANGE = (RHO_RANGE[0], 1e20)


class Family(enum.StrEnum):
    """The outcome's distribution; each takes its canonical link."""

    BINOMIAL = "binomial"  # a yes/no outcome, logit link
    POISSON = "poisson"  # a count, log link
    GAUSSIAN = "gaussian"  # a bounded number, identity link


LINKS: dict[Family, str] = {
    Family.BINOMIAL: "logit",
    Family.POISSON: "log",
    Family.GAUSSIAN: "identity",
}


@dataclass(frozen=True)
class Covariate:
    """One term of the design: a public category (one-hot) or a bounded numeric column."""

    column: str
    # A category's reference level (default: the first level of its public domain).
    reference: str | None = None
    # A numeric column's clamp bounds (default: the column's public bounds).
    clamp: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_identifier(self.column, "covariate")
        if self.reference is not None and self.clamp is not None:
            raise QueryError(
                f"covariate {self.column!r} has both a reference level (for a category) and "
                "clamp bounds (for a number); give the one that fits its column"
            )
        if self.clamp is not None:
            lo, hi = self.clamp
            if not (isinstance(lo, int | float) and isinstance(hi, int | float) and lo < hi):
                raise QueryError(
                    f"covariate {self.column!r}: clamp must be two numbers, lower < upper"
                )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; only what was chosen."""
        out: dict[str, Any] = {"column": self.column}
        if self.reference is not None:
            out["reference"] = self.reference
        if self.clamp is not None:
            out["clamp"] = [float(self.clamp[0]), float(self.clamp[1])]
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A generalised linear model over one view (or an ad hoc cohort), fitted across nodes."""

    view: str
    outcome: str
    family: Family
    covariates: tuple[Covariate, ...]
    rho: float
    # A region (node) effect: an indicator column for every node but the first.
    region: bool = False
    # For rates: a numeric column whose log is added to eta (e.g. person-time), clamped to
    # its public bounds, whose lower bound must be positive.
    offset: str | None = None
    # A binomial outcome is a category: this level counts as 1 (default "yes").
    event: str | None = None
    # A count or continuous outcome's clamp bounds (default: the column's public bounds).
    outcome_clamp: tuple[float, float] | None = None
    # Newton steps after the design check (None: DEFAULT_ITERATIONS; Gaussian: always 1).
    iterations: int | None = None
    cohort: Cohort | None = field(default=None)
    # Rows the model is fitted on (public values of public categories, as in a query); a
    # filtered category covariate has only the filter's levels in the design.
    where: tuple[Filter, ...] = ()
    # A public category whose levels are compared by observed/expected (indirect
    # standardisation): per-level outcome sums at the design check, and an expected step.
    compare_by: str | None = None
    # "newton" (IRLS over our protocol) or "gradient" (DP gradient-descent rounds, a held-out
    # fifth of the persons, and an evaluation step; trained over Flower).
    solver: str = "newton"
    # solver "gradient" only: 0 for a logistic model, else a network with one hidden layer of
    # this many tanh units (queries/mlp.py), whose per-person gradients are clipped to `clip`.
    hidden: int = 0
    clip: float = 1.0

    def __post_init__(self) -> None:
        check_identifier(self.view, "view")
        check_identifier(self.outcome, "outcome")
        if not isinstance(self.family, Family):
            raise QueryError(f"family must be one of {[f.value for f in Family]}")
        if not isinstance(self.rho, int | float) or isinstance(self.rho, bool):
            raise QueryError(f"rho must be a number, got {quote(self.rho)}")
        low, high = MODEL_RHO_RANGE
        if not low <= float(self.rho) <= high:
            got, lo, hi = show_apart(float(self.rho), low, high)
            raise QueryError(f"rho must be between {lo} and {hi}, got {got}")
        object.__setattr__(self, "rho", float(self.rho))
        if len(self.covariates) > MAX_COVARIATES:
            raise QueryError(f"a model takes at most {MAX_COVARIATES} covariates")
        columns = [c.column for c in self.covariates]
        if len(set(columns)) != len(columns):
            raise QueryError(f"covariates repeat: {quote(columns)}")
        if self.outcome in columns:
            raise QueryError(f"the outcome {self.outcome!r} cannot also be a covariate")
        if self.offset is not None:
            check_identifier(self.offset, "offset")
        if self.event is not None and self.family is not Family.BINOMIAL:
            raise QueryError("event (the outcome level counted as 1) is for binomial models")
        if self.outcome_clamp is not None and self.family is Family.BINOMIAL:
            raise QueryError("outcome_clamp is for count and continuous outcomes")
        if self.solver not in SOLVERS:
            raise QueryError(f"solver must be one of {list(SOLVERS)}, got {quote(self.solver)}")
        most = MAX_ROUNDS if self.solver == "gradient" else MAX_ITERATIONS
        if self.iterations is not None and (
            isinstance(self.iterations, bool)
            or not isinstance(self.iterations, int)
            or not 1 <= self.iterations <= most
        ):
            raise QueryError(f"iterations must be a whole number from 1 to {most}")
        if (
            isinstance(self.hidden, bool)
            or not isinstance(self.hidden, int)
            or not 0 <= self.hidden <= MAX_HIDDEN
        ):
            raise QueryError(f"hidden must be a whole number from 0 to {MAX_HIDDEN}")
        if self.hidden and self.solver != "gradient":
            raise QueryError("hidden: a network is trained by gradient descent (solver gradient)")
        if (
            isinstance(self.clip, bool)
            or not isinstance(self.clip, int | float)
            or not 0 < float(self.clip) <= MAX_CLIP
        ):
            raise QueryError(f"clip must be a number above 0 and at most {MAX_CLIP:g}")
        object.__setattr__(self, "clip", float(self.clip))
        if self.solver == "gradient" and (
            self.family is not Family.BINOMIAL or self.compare_by is not None
        ):
            raise QueryError(
                "solver: gradient descent trains binomial (logistic) models, without compare_by"
            )
        if len(self.where) > MAX_FILTERS:
            raise QueryError(f"the model has more than {MAX_FILTERS} filters")
        filtered = [f.column for f in self.where]
        if len(set(filtered)) != len(filtered):
            raise QueryError(f"filter columns repeat: {quote(filtered)}")
        if self.family is Family.GAUSSIAN and self.iterations not in (None, 1):
            raise QueryError("a Gaussian model is solved in one step; give no iterations")
        if self.compare_by is not None:
            check_identifier(self.compare_by, "compare_by")
            if self.family is Family.GAUSSIAN:
                raise QueryError(
                    "compare_by: observed/expected compares counts; use a binomial or Poisson model"
                )
            if self.compare_by in (*columns, self.outcome, self.offset):
                raise QueryError(
                    f"compare_by: {self.compare_by!r} is already in the model; the units "
                    "compared are not adjusted for (drop it from the covariates)"
                )

    @property
    def link(self) -> str:
        """The canonical link of the family."""
        return LINKS[self.family]

    @property
    def newton_steps(self) -> int:
        """How many steps after the design check the fit takes."""
        if self.family is Family.GAUSSIAN:
            return 1
        if self.solver == "gradient":
            return self.iterations or DEFAULT_ROUNDS
        return self.iterations or DEFAULT_ITERATIONS

    @property
    def steps(self) -> int:
        """Every charged step: the design check, the Newton steps, and any expected step."""
        extra = self.compare_by is not None or self.solver == "gradient"
        return 1 + self.newton_steps + (1 if extra else 0)

    @property
    def expected_step(self) -> int | None:
        """The step releasing each unit's sum of y - mu (None: the model compares nothing)."""
        return self.newton_steps + 1 if self.compare_by is not None else None

    @property
    def evaluation_step(self) -> int | None:
        """The step releasing the held-out persons' score histograms (solver gradient)."""
        return self.newton_steps + 1 if self.solver == "gradient" else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; model_from_dict(to_dict(m)) == m. Defaults are left out."""
        out: dict[str, Any] = {
            "version": MODEL_VERSION,
            "view": self.view,
            "outcome": self.outcome,
            "family": self.family.value,
            "covariates": [c.to_dict() for c in self.covariates],
            "rho": self.rho,
        }
        if self.region:
            out["region"] = True
        if self.offset is not None:
            out["offset"] = self.offset
        if self.event is not None:
            out["event"] = self.event
        if self.outcome_clamp is not None:
            out["outcome_clamp"] = [float(x) for x in self.outcome_clamp]
        if self.iterations is not None:
            out["iterations"] = self.iterations
        if self.cohort is not None:
            out["cohort"] = self.cohort.to_dict()
        if self.where:
            out["where"] = [{"column": f.column, "values": list(f.values)} for f in self.where]
        if self.compare_by is not None:
            out["compare_by"] = self.compare_by
        if self.solver != "newton":
            out["solver"] = self.solver
        if self.hidden:
            out["hidden"] = self.hidden
            out["clip"] = self.clip
        return out


def design_columns(model: ModelSpec, view: ViewSpec, regions: Sequence[str]) -> tuple[str, ...]:
    """The coefficient vector's columns, from public information only.

    "(intercept)", then per covariate in order: a category's non-reference levels as
    "column[level]", a number as "column"; then, with a region effect, "region[NODE]" for
    every node but the first of `regions` (the hub's order, which it sends every node).
    """
    columns = [INTERCEPT]
    for c in model.covariates:
        spec = view.column(c.column)
        if spec.type is ColumnType.CATEGORY:
            if c.clamp is not None:
                raise QueryError(f"covariate {c.column!r} is a category: give no clamp")
            kept = next((f.values for f in model.where if f.column == c.column), None)
            levels = [v for v in spec.domain if kept is None or v in kept]
            if len(levels) < 2:
                raise QueryError(
                    f"covariate {c.column!r} keeps {len(levels)} level(s) of its public domain "
                    f"{quote(list(spec.domain))} after the filters; a covariate needs two"
                )
            reference = c.reference if c.reference is not None else levels[0]
            if reference not in levels:
                raise QueryError(
                    f"covariate {c.column!r}: reference level {quote(reference)} is not one of "
                    f"its levels {quote(levels)}"
                )
            columns += [f"{c.column}[{level}]" for level in levels if level != reference]
        elif spec.type in (ColumnType.INTEGER, ColumnType.FLOAT):
            if c.reference is not None:
                raise QueryError(f"covariate {c.column!r} is a number: give no reference level")
            if c.clamp is None and not spec.bounded:
                raise QueryError(
                    f"covariate {c.column!r} has no public bounds; give clamp: [lower, upper]"
                )
            columns.append(c.column)
        else:
            raise QueryError(f"column {c.column!r} cannot be a covariate")
    if model.region:
        if len(regions) < 2:
            raise QueryError("a region effect needs at least two regions")
        columns += [f"region[{r}]" for r in regions[1:]]
    if len(columns) > MAX_PARAMETERS:
        raise QueryError(
            f"the design has {len(columns)} parameters, more than the limit of {MAX_PARAMETERS}"
        )
    return tuple(columns)


@dataclass(frozen=True)
class StepRelease:
    """What one node released for one step of a fit: named noisy vectors and their noise.

    Vectors (design check): "n" (1 value), "level_counts" (one per design column, the
    intercept's being n again, numeric columns' 0), "outcome_sum" (1). Vectors (Newton
    step): "gradient" (one per design column) and "hessian" (the upper triangle,
    row-major); Gaussian: "xtx" (upper triangle), "xty", "yty", "n". A model with
    compare_by adds "unit_outcome" to the design check and has an expected step releasing
    "unit_residual" (sum of y - mu), one value per level of `units`. Each vector's noise
    variance is per entry (the discrete Gaussian's sigma^2, in the vector's units).
    """

    node: str
    step: int
    columns: tuple[str, ...]
    vectors: Mapping[str, tuple[float, ...]]
    variances: Mapping[str, float]
    rho: float
    units: tuple[str, ...] = ()
