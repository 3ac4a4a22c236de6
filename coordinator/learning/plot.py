"""Forest plots of fitted models with matplotlib (PNG or SVG, chosen by the file's suffix)."""

from __future__ import annotations

import math
from pathlib import Path

# A Figure of its own, not pyplot: no global state, no display, no GUI toolkit.
from matplotlib.figure import Figure

from queries.errors import ConfigError
from queries.fitted import FittedModel
from queries.model import INTERCEPT

FORMATS = {".png": "png", ".svg": "svg"}


def figure_paths(plot: Path, option: str = "--plot") -> tuple[Path, ...]:
    """The files a figure option writes: NAME.png or NAME.svg as given, or both for NAME."""
    if plot.suffix == "":
        return tuple(plot.with_suffix(s) for s in FORMATS)
    if plot.suffix.lower() not in FORMATS:
        raise ConfigError(
            f"{option} {plot}: give a file ending in .png or .svg, or a name without a suffix "
            "for both"
        )
    return (plot,)


def forest_plot(fitted: FittedModel, path: Path) -> Path:
    """Each coefficient but the intercept with its 95% interval; ratios on a log axis."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: a forest plot is written as .png or .svg, by its suffix")
    rows = [c for c in fitted.coefficients if c.column != INTERCEPT]
    if not rows:
        raise ConfigError("the model has no coefficient but the intercept: nothing to plot")
    ratios = fitted.has_ratios
    centre = [math.exp(c.estimate) if ratios else c.estimate for c in rows]
    low = [math.exp(c.ci_low) if ratios else c.ci_low for c in rows]
    high = [math.exp(c.ci_high) if ratios else c.ci_high for c in rows]
    # A coefficient given no interval (fit.py: its noise not estimable) is drawn without bars.
    low = [lo if math.isfinite(c.ci_low) else m for c, lo, m in zip(rows, low, centre, strict=True)]
    high = [
        h if math.isfinite(c.ci_high) else m for c, h, m in zip(rows, high, centre, strict=True)
    ]
    fig = Figure(figsize=(7.0, 0.45 * len(rows) + 1.6))
    ax = fig.subplots()
    ys = list(range(len(rows)))[::-1]
    ax.errorbar(
        centre,
        ys,
        xerr=[
            [c - lo for c, lo in zip(centre, low, strict=True)],
            [hi - c for c, hi in zip(centre, high, strict=True)],
        ],
        fmt="s",
        color="black",
        ecolor="grey",
        capsize=3,
    )
    ax.axvline(1.0 if ratios else 0.0, color="grey", linestyle="--", linewidth=0.8)
    if ratios:
        ax.set_xscale("log")
    ax.set_yticks(ys, [c.column for c in rows])
    label = fitted.ratio_name or "coefficient"
    ax.set_xlabel(f"{label} (95% CI: DP noise and sampling)")
    ax.set_title(f"{fitted.family.value} model, {fitted.persons} persons")
    fig.tight_layout()
    fig.savefig(path, format=fmt)
    return path
