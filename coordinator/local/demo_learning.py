"""`chc demo --learning`: a comparison of care sites and an ITS with DiD on the synthetic regions.

Run by run_demo after its pathway report, with the analyst's Federation client it already has.
Every step is one of the analyst's own commands' functions (coordinator/learning): the demo
shows them on data whose answers are known (synth.WORSE_TRUST, synth.INTERVENTION).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from coordinator.analyst.client import Federation
from coordinator.learning.compare import Comparison, adjusting_model, compare
from coordinator.learning.its_cli import ItsRun, run_its
from coordinator.learning.its_plot import its_plot
from coordinator.learning.plot import figure_paths
from coordinator.local import synth
from protocols.cli import CommandFailedError
from queries.errors import ConfigError
from queries.spec import Filter

# Each learning step spends at most 1 at each node (the demo nodes' max_rho_per_query): with
# the pathway queries before them the total stays well under the nodes' total_rho of 10.
COMPARE_RHO = 1.0
ITS_RHO = 1.0
ADJUST = ("age_band", "sex", "imd_quintile", "region")
# The known model's persons (docs/synthetic-data.md): 40 and over, female or male, a known
# IMD quintile. The other levels are sparse: each would add a coefficient of mostly noise.
WHERE = (
    Filter("sex", ("female", "male")),
    Filter("age_band", ("40-64", "65-79", "80+")),
    Filter("imd_quintile", ("1", "2", "3", "4", "5")),
)
ITS_CONTROLS = ("nenc", "yh")
# At most two admissions counted per child: the noise scales with the cap (the view's own is
# 20), and few children have more than two in the span, before or after alike.
ITS_ROWS_PER_PERSON = 2
ITS_START = "2023-01"
# The default --persons with --learning: the smallest monthly count of the three ITS regions
# is then about 19 (nwc, seed 2015) against the release rules' threshold of 8 and a noise sd
# of about 1.4, so no month is withheld; and about 500 expected events per trust let the
# funnel find the worse trust (fewer persons: fewer events, wider limits).
LEARNING_PERSONS = 2_000_000


# demo._step, passed in (demo imports this module): a step's progress on the console.
Step = Callable[[Console, str], AbstractContextManager[None]]


@dataclass(frozen=True)
class LearningResult:
    """The comparison, the ITS/DiD run (or why it was refused), and the figures written."""

    comparison: Comparison
    its: ItsRun | None
    figures: tuple[Path, ...]
    its_refused: CommandFailedError | None = None

    @property
    def exit_code(self) -> int:
        """The demo's exit code: the ITS's refusal's, else 0."""
        return int(self.its_refused.code) if self.its_refused is not None else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the `learning` key of `chc demo --learning --json`."""
        return {
            "comparison": self.comparison.to_dict(),
            "its": self.its.out if self.its is not None else {"refused": str(self.its_refused)},
            "figures": [str(p) for p in self.figures],
        }


def run_learning(fed: Federation, figures: Path, console: Console, step: Step) -> LearningResult:
    """Compare the care sites, fit the ITS with DiD, and write their figures to `figures`."""
    figures.mkdir(parents=True, exist_ok=True)
    model = adjusting_model(
        "copd", "admitted", list(ADJUST), COMPARE_RHO, by="care_site", where=WHERE
    )
    with step(
        console,
        f"Comparing care sites: COPD emergency admissions, O/E adjusted for "
        f"{', '.join(ADJUST)} (rho={COMPARE_RHO:g} per node)",
    ):
        comparison = compare(fed, model, by="care_site")
        funnel = comparison.plots(figures / "funnel-care-sites")
    t = synth.INTERVENTION
    try:
        with step(
            console,
            f"Interrupted time series: {t.pathway} admissions, {t.region} from "
            f"{t.start_month} against {'+'.join(ITS_CONTROLS)} (rho={ITS_RHO:g} per node)",
        ):
            run = run_its(
                fed,
                t.pathway,
                t.start_month,
                ITS_RHO,
                region=t.region,
                controls=ITS_CONTROLS,
                start=ITS_START,
                rows_per_person=ITS_ROWS_PER_PERSON,
            )
            stem = figures / f"its-{t.pathway}-{t.region}"
            plots = tuple(its_plot(run.panels, path) for path in figure_paths(stem))
    except CommandFailedError as exc:
        # A month withheld under the release rules (too few persons): the comparison stands
        # and is reported; the refusal is said, and is the demo's exit code.
        return LearningResult(comparison, None, funnel, its_refused=exc)
    return LearningResult(comparison, run, (*funnel, *plots))


def learning_lines(result: LearningResult) -> Iterator[str]:
    """The printed report: the comparison's table, the ITS estimates, the figures' paths."""
    c = result.comparison
    worse = synth.WORSE_TRUST
    yield "Risk-adjusted comparison of care sites (COPD emergency admissions, O/E)"
    yield c.summary()
    found = (
        "flagged it outside the 99.8% limits"
        if worse in c.outliers
        else "flagged it outside the 95% limits only"
        if worse in c.alerts
        else "did not flag it (too few events at this size: try more --persons)"
    )
    yield (
        f"{worse} is the synthetic data's deliberately worse trust (odds of admission "
        f"x{synth.WORSE_TRUST_ODDS:g}); the comparison {found}."
    )
    yield ""
    t = synth.INTERVENTION
    yield (
        f"Interrupted time series with difference-in-differences: {t.pathway} emergency "
        f"admissions in {t.region}, intervention {t.start_month} (the synthetic data's known "
        f"effect: rate ratio {t.rate_ratio:g}), controls {'+'.join(ITS_CONTROLS)}"
    )
    if result.its is not None:
        yield from result.its.lines
    else:
        yield (
            f"Not fitted: {result.its_refused}. With fewer persons the monthly counts fall "
            "towards the release rules' threshold; the default with --learning is "
            f"--persons {LEARNING_PERSONS:,}."
        )
    yield ""
    yield "Figures:"
    yield from (f"  {p}" for p in result.figures)


def check_learning(nodes: Sequence[str]) -> None:
    """Refuse --learning with custom nodes: its answers are known on synthetic data only."""
    if nodes:
        raise ConfigError(
            "--learning runs on the synthetic regions only (their worse trust and intervention "
            "are known); leave out --node to use it"
        )
