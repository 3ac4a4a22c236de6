"""What `Federation.fit` returns: the hub's fitted model, with a summary table and a plot."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from queries.fitted import FittedModel
from queries.model import ModelSpec
from queries.results import NodeStatus


@dataclass(frozen=True)
class FitResult(FittedModel):
    """A fitted model and the spec it answers; `summary()` reads it, `forest_plot()` draws it."""

    model: ModelSpec | None = None

    @classmethod
    def of(cls, fitted: FittedModel, model: ModelSpec | None = None) -> FitResult:
        """Wrap the hub's fitted model."""
        values = {f.name: getattr(fitted, f.name) for f in dataclasses.fields(FittedModel)}
        return cls(**values, model=model)

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per coefficient (the table of to_arrow)."""
        return [
            {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in r.items()
            }
            for r in self.to_arrow().to_pylist()
        ]

    def to_dict(self) -> dict[str, Any]:
        """The whole result, JSON-ready (`chc learn glm --json`)."""
        return {
            "query_id": self.query_id,
            "family": self.family.value,
            "link": self.link,
            "persons": self.persons,
            "partial": self.partial,
            "message": self.message,
            "coefficients": self.rows(),
            "iterations": [dataclasses.asdict(i) for i in self.iterations],
            "nodes": [
                {
                    "node": o.node,
                    "status": o.status.value,
                    "message": o.message,
                    "rho_charged": o.rho_charged,
                }
                for o in self.nodes
            ],
            **({"model": self.model.to_dict()} if self.model is not None else {}),
        }

    def summary(self) -> str:
        """A readable table: estimate, DP-only and total SE, 95% CI, and ratio with its CI."""
        ratio = self.ratio_name
        head = ["coefficient", "estimate", "SE (DP)", "SE (total)", "95% CI"]
        if ratio:
            head += [ratio, "95% CI"]
        body = []
        for c in self.coefficients:
            row = [
                c.column,
                f"{c.estimate:.4g}",
                f"{c.dp_std_error:.3g}",
                f"{c.std_error:.3g}",
                f"{c.ci_low:.4g} to {c.ci_high:.4g}",
            ]
            if ratio:
                row += [
                    f"{_exp(c.estimate):.4g}",
                    f"{_exp(c.ci_low):.4g} to {_exp(c.ci_high):.4g}",
                ]
            body.append(row)
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
        lines = [
            f"{self.family.value} model ({self.link} link), {self.persons} persons"
            + (" (partial)" if self.partial else ""),
            "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
        ]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body]
        charged = ", ".join(
            f"{o.node} {o.rho_charged:.4g}" if o.status is NodeStatus.OK else f"{o.node} {o.status}"
            for o in self.nodes
        )
        lines += [
            f"rho charged: {charged}",
            f"{len(self.iterations)} step(s) after the design check; {self.message}",
            "SE (DP): the noise alone (its interval covers the noiseless pooled fit); "
            "SE (total): noise and sampling (the 95% CI is for the population coefficient)",
        ]
        return "\n".join(line.rstrip() for line in lines)

    def forest_plot(self, path: Path | str) -> Path:
        """Write a forest plot of the ratios (or coefficients) as PNG or SVG, by suffix."""
        from coordinator.learning.plot import forest_plot  # matplotlib only when drawn

        return forest_plot(self, Path(path))


def _exp(x: float) -> float:
    # exp of a huge coefficient says "infinite" rather than failing the whole table.
    return math.exp(x) if x < 700 else math.inf
