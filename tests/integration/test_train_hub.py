"""`chc learn train` through the hub: its SuperLink, the nodes' supervised SuperNodes, the RPC.

A LocalFederation with learning on: the hub starts a SuperLink on loopback, registers every
node's SuperNode key from hub.toml and opens its Fleet proxy (nginx, mutual TLS, node
certificates only); every node runs a SuperNode under a supervisor, dialling the proxy
through its own forwarder (node.toml [learning] hub_fleet), as it would across a network.
The nodes start before the hub, so each SuperNode first fails to activate (its key is not
registered yet) and is restarted with backoff until it joins: the order in which a
federation's parts come up does not matter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.analyst.client import Federation
from coordinator.cli import app
from coordinator.local import synth
from coordinator.local.federation import AUDITOR_NAME, LocalFederation, NodeSetup
from protocols.security.pki import Role
from queries.errors import QueryError
from queries.model import Covariate, Family, ModelSpec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PERSONS = 400_000
REGIONS = ("nenc", "nwc")
ROUNDS = 3


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("train_hub")
    folders = synth.generate_federation(PERSONS, root / "data", seed=4)
    setups = tuple(
        NodeSetup(
            name=r,
            omop=folders[r],
            title=r,
            imd_lookup=folders[r] / synth.LOOKUP_FILE,
            pathways=(synth.KNOWN_PATHWAY,),
        )
        for r in REGIONS
    )
    with LocalFederation(
        workdir=root / "fed", nodes=setups, deadline_ms=60_000, learning=True
    ) as federation:
        yield federation


def _args(fed: LocalFederation) -> list[str]:
    return ["--hub", fed.hub_address, "--identity", str(fed.analyst_identity)]


def test_chc_learn_train_trains_over_the_hubs_superlink(
    fed: LocalFederation, tmp_path: Path
) -> None:
    out = tmp_path / "model.json"
    run = CliRunner().invoke(
        app,
        [
            "learn",
            "train",
            "--pathway",
            "copd",
            "--outcome",
            "admitted",
            "--adjust",
            "age_band,sex",
            "--rounds",
            str(ROUNDS),
            "--rho",
            "1",
            "--where",
            "sex=female,male",
            "--where",
            "age_band=40-64,65-79,80+",
            "--out",
            str(out),
            *_args(fed),
        ],
    )
    assert run.exit_code == 0, run.output
    assert "held-out AUC" in run.stdout
    assert "privacy spent (rho): " in run.stdout
    saved = json.loads(out.read_text())
    assert len(saved["rounds"]) == ROUNDS
    assert {n["node"] for n in saved["nodes"]} == set(REGIONS)
    # The whole rho at each node, one ledger entry a step (design, rounds, evaluation).
    for node in saved["nodes"]:
        assert node["rho_charged"] == pytest.approx(1.0, rel=1e-6)
        assert len(node["ledger_sequences"]) == ROUNDS + 2
    assert 0.5 < saved["held_out_auc"] < 1.0
    auditor = fed.identity_dir(Role.AUDITOR, AUDITOR_NAME)
    run = CliRunner().invoke(
        app, ["audit", "verify", "--hub", fed.hub_address, "--identity", str(auditor), "--json"]
    )
    assert run.exit_code == 0, run.output
    assert all(node["ok"] for node in json.loads(run.output))


def test_a_newton_model_is_refused_by_train_before_any_charge(fed: LocalFederation) -> None:
    model = ModelSpec(
        view="copd",
        outcome="admitted",
        family=Family.BINOMIAL,
        covariates=(Covariate("sex"),),
        rho=0.5,
    )
    started = time.monotonic()
    with Federation(fed.hub_address, fed.analyst_identity) as client:
        before = {b.node: b.budget.rho_spent for b in client.budget() if b.budget}
        with pytest.raises(QueryError, match="solver: Train runs models whose solver is"):
            client.train(model, timeout_s=60)
        after = {b.node: b.budget.rho_spent for b in client.budget() if b.budget}
    assert after == before
    assert time.monotonic() - started < 30
