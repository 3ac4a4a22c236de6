"""Risk-adjusted comparison end to end: four real nodes, the hub, O/E and the funnel plot.

The synthetic COPD pathway has known region effects on the log-odds of `admitted`
(coordinator/local/synth/known.py, KNOWN_REGION_EFFECTS: nwc +0.25 the worst, yh -0.1).
The adjusting model is the known model without its region effect, so each region's O/E
against the pooled model reflects its region effect. The truth is the noiseless O/E:
statsmodels on the pooled rows (the same OmopStore the nodes serve), without region.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import statsmodels.api as sm
from typer.testing import CliRunner

from coordinator.analyst.client import Federation, NodeBudget
from coordinator.cli import app
from coordinator.learning import funnel
from coordinator.learning.compare import compare
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from coordinator.local.synth.known import pooled_design
from node.data.catalog import cohort_view
from queries.model import ModelSpec
from queries.spec import Filter
from tests.integration._known_rows import known_pathway, known_rows

pytestmark = pytest.mark.integration

PERSONS = 400_000  # over four regions: about 8,400 persons on the COPD pathway
RHO = 1000.0
REGIONS = tuple(r.slug for r in synth.REGIONS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return synth.generate_federation(PERSONS, tmp_path_factory.mktemp("data"), seed=11)


@pytest.fixture(scope="module")
def federation(
    folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalFederation]:
    setups = tuple(
        NodeSetup(
            name=r.slug,
            omop=folders[r.slug],
            title=r.name,
            total_rho=100 * RHO,
            max_rho_per_query=RHO,
            imd_lookup=folders[r.slug] / synth.LOOKUP_FILE,
        )
        for r in synth.REGIONS
    )
    with LocalFederation(
        workdir=tmp_path_factory.mktemp("fed"), nodes=setups, deadline_ms=60_000
    ) as fed:
        yield fed


def _model() -> ModelSpec:
    model = synth.known_model(RHO, under_40=False, iterations=8)
    imd = Filter("imd_quintile", ("1", "2", "3", "4", "5"))
    return dataclasses.replace(model, region=False, where=(*model.where, imd))


def _designs(
    folders: dict[str, Path], model: ModelSpec
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each region's noiseless design and outcome (X, y), as the nodes compute them."""
    pathway = known_pathway()
    out = {}
    for region in REGIONS:
        rows = known_rows(folders[region])
        _, x, y = pooled_design(model, cohort_view(pathway), {region: rows})
        out[region] = (x, y)
    return out


def _expected(x: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(1.0 / (1.0 + np.exp(-(x @ b)))))


def _level(flag: str) -> float:
    """The level a flag names ("above 99.8%" -> 0.998; none -> 0)."""
    return float(flag.split()[1].rstrip("%")) / 100 if flag else 0.0


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _is_svg(path: Path) -> bool:
    root = ElementTree.parse(path).getroot()  # noqa: S314 - a file this test wrote
    return path.stat().st_size > 0 and root.tag.endswith("svg")


def test_the_funnel_flags_the_regions_the_noiseless_ratios_put_outside_its_limits(
    federation: LocalFederation, folders: dict[str, Path], tmp_path: Path
) -> None:
    model = _model()
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        result = compare(fed, model)
    designs = _designs(folders, model)
    x = np.concatenate([d[0] for d in designs.values()])
    y = np.concatenate([d[1] for d in designs.values()])
    mle = np.asarray(sm.GLM(y, x, family=sm.families.Binomial()).fit(tol=1e-12).params)
    sent = np.array(result.fit.totals_coefficients)
    assert sent.shape == mle.shape
    # The last step's coefficients are the pooled fit's up to the fit's DP noise.
    dp_se = np.array([c.dp_std_error for c in result.fit.coefficients])
    assert np.all(np.abs(sent - mle) < 12 * dp_se)
    assert [u.unit for u in result.units] == list(REGIONS)
    checked = 0
    for u in result.units:
        xr, yr = designs[u.unit]
        observed, expected = float(yr.sum()), _expected(xr, sent)
        totals = next(n for n in result.fit.node_totals if n.node == u.unit)
        # Each noisy total is the noiseless one plus its stated noise, and so is the ratio
        # (6 sd each: false failures of 2e-9, 3e-8 over this test's 16 such checks).
        assert u.observed == pytest.approx(observed, abs=6 * math.sqrt(totals.outcome_variance))
        sd_e = math.sqrt(totals.outcome_variance + totals.residual_variance)
        assert u.expected == pytest.approx(expected, abs=6 * sd_e)
        ratio, tol = observed / expected, 6 * math.sqrt(u.dp_variance)
        assert u.ratio == pytest.approx(ratio, abs=tol)
        # Where the noiseless ratio is clear of a limit by more than the noise, the flag
        # must follow it; nearer a limit the noise may go either way: nothing is asserted.
        for level in funnel.LEVELS:
            lows, highs = zip(
                funnel.limits(expected, level, u.residual_variance),
                funnel.limits(u.expected, level, u.residual_variance),
                strict=True,
            )
            if ratio > max(highs) + tol:
                assert u.flag.startswith("above")
                assert _level(u.flag) >= level
            elif ratio < min(lows) - tol:
                assert u.flag.startswith("below")
                assert _level(u.flag) >= level
            elif max(lows) + tol < ratio < min(highs) - tol:
                assert _level(u.flag) < level
            else:
                continue
            checked += 1
    # These data put no region near a limit: every flag is decided, none vacuously.
    assert checked == 2 * len(REGIONS)
    # nwc has the worst known region effect (+0.25 on the log-odds): it is named.
    assert result.units[REGIONS.index("nwc")].flag == "above 99.8%"
    assert "nwc" in result.outliers
    assert "nwc" in result.summary()
    png, svg = result.plot(tmp_path / "funnel.png"), result.plot(tmp_path / "funnel.svg")
    assert _is_png(png)
    assert _is_svg(svg)
    assert "nwc" in svg.read_text()


def test_chc_learn_compare_prints_the_table_and_writes_both_figures(
    federation: LocalFederation, tmp_path: Path
) -> None:
    hub = ["--hub", federation.hub_address, "--identity", str(federation.analyst_identity)]
    args = [
        "learn", "compare", "--pathway", "copd", "--outcome", "admitted", "--by", "region",
        "--adjust", "age_band,sex,imd_quintile", "--rho", "100",
        "--where", "sex=female,male", "--where", "age_band=40-64,65-79,80+",
        "--where", "imd_quintile=1,2,3,4,5",
    ]  # fmt: skip
    runner = CliRunner()
    png = tmp_path / "f.png"
    run = runner.invoke(app, [*args, *hub, "--json", "--plot", str(png)])
    assert run.exit_code == 0, run.output
    payload = json.loads(run.stdout)
    assert [u["unit"] for u in payload["units"]] == list(REGIONS)
    assert set(payload["outliers"]) <= set(REGIONS)
    assert _is_png(png)
    svg = tmp_path / "f.svg"
    run = runner.invoke(app, [*args, *hub, "--overdispersion", "--plot", str(svg)])
    assert run.exit_code == 0, run.output
    assert "O/E" in run.stdout
    assert "phi" in run.stdout
    assert _is_svg(svg)
    # These nodes declare no care sites: each refuses the fit at its design check, at no
    # cost, saying why (tests/integration/test_compare_sites.py compares declared ones).
    before = {b.node: b.budget.rho_spent for b in _budgets(federation) if b.budget}
    run = runner.invoke(app, [*args[:7], "care_site", *args[8:], *hub])
    assert run.exit_code != 0
    assert "has not declared care sites" in run.output
    after = {b.node: b.budget.rho_spent for b in _budgets(federation) if b.budget}
    assert after == before


def _budgets(federation: LocalFederation) -> list[NodeBudget]:
    with Federation(federation.hub_address, federation.analyst_identity) as fed:
        return fed.budget()
