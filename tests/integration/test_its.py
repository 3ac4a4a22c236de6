"""`chc learn its` end to end on a real federation: one DP query by month, the segmented
regression at the analyst's side, DiD with --control, and the figures as PNG and SVG."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup

# Children with asthma in nwc: about 15 emergency admissions a month. The custodians here
# release small noisy counts ([release] suppress_below = 0): a month withheld (below 0 after
# noise) makes the command refuse the series, which at these counts is vanishingly rare.
PERSONS = 1_000_000
OPEN_RELEASE = "[release]\nsuppress_below = 0\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T = synth.INTERVENTION


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """Four synthetic regions with the known intervention in nwc."""
    root = tmp_path_factory.mktemp("its")
    folders = synth.generate_federation(PERSONS, root / "data", seed=11)
    setups = tuple(
        NodeSetup(
            name=r.slug,
            omop=folders[r.slug],
            title=r.name,
            pathways=(T.pathway,),
            extra_toml=OPEN_RELEASE,
        )
        for r in synth.REGIONS
    )
    with LocalFederation(
        workdir=root, nodes=setups, deadline_ms=20_000, hub_extra_toml=OPEN_RELEASE
    ) as fed:
        yield fed


def _run(fed: LocalFederation, *args: str) -> tuple[int, str]:
    hub = ["--hub", fed.hub_address, "--identity", str(fed.analyst_identity)]
    base = ["learn", "its", "--pathway", T.pathway, "--intervention", T.start.isoformat()]
    extra = ["--start", "2023-01", "--rows-per-person", "2"]
    run = CliRunner().invoke(app, [*base, *args, *hub, *extra])
    return run.exit_code, run.stdout if run.exit_code == 0 else run.output


def test_its_prints_the_step_and_writes_png_and_svg(
    federation: LocalFederation, tmp_path: Path
) -> None:
    png, svg = tmp_path / "its.png", tmp_path / "its.svg"
    code, out = _run(federation, "--region", T.region, "--rho", "1", "--json", "--plot", str(png))
    assert code == 0, out
    payload = json.loads(out)
    assert payload["query"]["view"] == f"{T.pathway}_admissions"
    assert payload["months"][0] == "2023-01"
    assert payload["months"][-1] == "2025-12"
    assert payload["seasonal"] is True
    assert all(v > 0 for v in payload["noise_variance"])  # the release's DP variance is used
    rr = payload["rate_ratio"]
    assert 0 < rr["ci_low"] < rr["estimate"] < rr["ci_high"]
    assert png.stat().st_size > 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    code, out = _run(federation, "--region", T.region, "--rho", "1", "--plot", str(svg))
    assert code == 0, out
    assert "rate ratio at the step" in out
    assert "step (level change)" in out
    assert svg.stat().st_size > 0
    assert ET.parse(svg).getroot().tag.endswith("svg")  # noqa: S314 - our own file


def test_did_against_the_controls_shows_the_parallel_trends_check(
    federation: LocalFederation, tmp_path: Path
) -> None:
    svg = tmp_path / "did.svg"
    args = ("--region", T.region, "--control", "nenc,yh", "--rho", "1")
    code, out = _run(federation, *args, "--json", "--plot", str(svg))
    assert code == 0, out
    payload = json.loads(out)
    assert payload["control"]["series"] == "nenc+yh"
    d = payload["did_rate_ratio"]
    assert math.isfinite(d["estimate"])
    assert d["ci_low"] < d["estimate"] < d["ci_high"]
    assert "pre_trend_difference" in payload
    assert ET.parse(svg).getroot().tag.endswith("svg")  # noqa: S314 - our own file
    # A name without a suffix writes both figures.
    stem = tmp_path / "did-both"
    code, out = _run(federation, *args, "--plot", str(stem))
    assert code == 0, out
    assert "difference-in-differences rate ratio" in out
    assert "parallel-trends check" in out
    assert f"written to {stem}.png and {stem}.svg" in out
    assert stem.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    assert stem.with_suffix(".png").stat().st_size > 10_000
    assert ET.parse(stem.with_suffix(".svg")).getroot().tag.endswith("svg")  # noqa: S314


def test_bad_requests_are_refused_before_any_query(federation: LocalFederation) -> None:
    code, out = _run(federation, "--region", "nwc", "--control", "nwc", "--rho", "1")
    assert code != 0
    assert "a control must not" in out
    code, out = _run(federation, "--outcome", "deaths", "--rho", "1")
    assert code != 0
    assert "--outcome 'deaths'" in out
    code, out = _run(federation, "--region", "atlantis", "--rho", "0.01")
    assert code != 0
    assert "not a node of this federation" in out
