"""Training over Flower end to end: two real nodes, their SuperNodes, a TLS SuperLink.

Each node runs its chc gRPC service (a LocalFederation) and a SuperNode whose ClientApp
relays every round to the node's own FitStep (node/flower/relay.py), so each round is
verified, charged in the node's ledger and noised by the node. The model is the synthetic
known model's covariates without region (COPD emergency admissions), trained by DP gradient
descent (solver "gradient") at rho 1 per node; it is held to a central non-private logistic
fit on the pooled training persons, both scored on the same held-out persons.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import statsmodels.api as sm
from scipy.stats import rankdata
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.learning.flower.session import (
    TrainingFailedError,
    sign_training,
    train_over_flower,
)
from coordinator.learning.flower.superlink import SuperLink, SuperLinkTls
from coordinator.local import synth
from coordinator.local.federation import AUDITOR_NAME, LocalFederation, NodeSetup
from coordinator.local.synth.known import pooled_design
from node.data.catalog import cohort_view
from node.flower.supernode import SuperNodeProcess, make_supernode_key
from protocols.security.pki import CA_FILE, Role, load_identity
from queries import mlp
from queries.model import ModelSpec
from tests.integration._known_rows import known_pathway, known_rows
from tests.unit._model_helpers import held_out

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PERSONS = 800_000  # over four regions; two of them here: about 8,000 on the COPD pathway
REGIONS = ("nenc", "nwc")
ROUNDS = 8
RHO = 1.0
# The DP model's held-out AUC may trail the central one by this much (8 rounds of a
# first-order method, DP noise at rho 1, 48-bin histograms; measured gap about 0.01).
AUC_MARGIN = 0.03


@dataclass
class Training:
    """The running federation, SuperLink and SuperNodes."""

    fed: LocalFederation
    link: SuperLink
    supernodes: dict[str, SuperNodeProcess]
    folders: dict[str, Path]
    root: Path


@pytest.fixture(scope="module")
def training(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Training]:
    root = tmp_path_factory.mktemp("train")
    folders = synth.generate_federation(PERSONS, root / "data", seed=21)
    setups = tuple(
        NodeSetup(
            name=r,
            omop=folders[r],
            title=r,
            total_rho=10 * RHO,
            max_rho_per_query=RHO,
            imd_lookup=folders[r] / synth.LOOKUP_FILE,
            pathways=(synth.KNOWN_PATHWAY,),
        )
        for r in REGIONS
    )
    with LocalFederation(workdir=root / "fed", nodes=setups, deadline_ms=60_000) as fed:
        tls = SuperLinkTls.issue(fed.pki, root / "superlink_tls")
        with SuperLink(root / "superlink", tls) as link:
            supernodes: dict[str, SuperNodeProcess] = {}
            try:
                for name in REGIONS:
                    identity = fed.identity_dir(Role.NODE, name)
                    private, public = make_supernode_key(root / "supernode_keys" / name)
                    node = SuperNodeProcess(
                        root / "supernodes" / name,
                        superlink=link.address,
                        root_certificate=fed.pki / CA_FILE,
                        private_key=private,
                        node_config={
                            "node-name": name,
                            "node-address": f"127.0.0.1:{fed.node_port(name)}",
                            "identity-dir": str(identity),
                        },
                    )
                    link.register(name, public)
                    node.start()
                    supernodes[name] = node
                link.wait_online(len(REGIONS), timeout_s=90)
                yield Training(fed, link, supernodes, folders, root)
            finally:
                for node in supernodes.values():
                    node.stop()


def _model(rounds: int = ROUNDS) -> ModelSpec:
    base = synth.known_model(RHO, under_40=False, unknown_address=False)
    return dataclasses.replace(base, region=False, solver="gradient", iterations=rounds)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    r = rankdata(s)
    n1 = y.sum()
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def _held_out_design(
    folders: dict[str, Path], model: ModelSpec
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray]:
    """The pooled design (columns, X, y) of the nodes' rows, and which rows are held out."""
    rows = {r: known_rows(folders[r], person_id=True) for r in REGIONS}
    columns, x, y = pooled_design(model, cohort_view(known_pathway()), rows)
    kept = []
    for r in REGIONS:
        table = rows[r]
        mask = np.ones(table.num_rows, dtype=bool)
        for f in model.where:
            mask &= np.isin(np.asarray(table[f.column].to_pylist(), dtype=object), f.values)
        kept.append(np.asarray(table.filter(pa.array(mask))["person_id"].to_pylist()))
    held = np.array([held_out(int(p)) for p in np.concatenate(kept)])
    return columns, x, y, held


def _central(
    folders: dict[str, Path], model: ModelSpec, coefficients: dict[str, float]
) -> tuple[float, float]:
    """(central AUC, the DP model's AUC) on the held-out persons, exact, from the rows."""
    columns, x, y, held = _held_out_design(folders, model)
    fit = sm.GLM(y[~held], x[~held], family=sm.families.Binomial()).fit()
    dp = np.array([coefficients[c] for c in columns])
    return _auc(y[held], x[held] @ np.asarray(fit.params)), _auc(y[held], x[held] @ dp)


def _ledger_entries(fed: LocalFederation) -> dict[str, list[dict[str, object]]]:
    from protocols.ledger.entry import decode_body
    from protocols.ledger.file import read_ledger_file

    out = {}
    for name in REGIONS:
        path = fed.workdir / "conf" / f"{name}.ledger.sqlite"
        out[name] = [decode_body(e.body) for e in read_ledger_file(path) if not e.head]
    return out


def _verify(fed: LocalFederation) -> None:
    auditor = fed.identity_dir(Role.AUDITOR, AUDITOR_NAME)
    run = CliRunner().invoke(
        app, ["audit", "verify", "--hub", fed.hub_address, "--identity", str(auditor), "--json"]
    )
    assert run.exit_code == 0, run.output
    for node in json.loads(run.output):
        assert node["ok"], node["anomalies"]


def test_a_logistic_model_trains_over_flower_within_the_margin_of_the_central_fit(
    training: Training,
) -> None:
    model = _model()
    analyst = load_identity(training.fed.analyst_identity)
    envelope = sign_training(analyst, model)
    started = time.monotonic()
    trained = train_over_flower(
        training.link, envelope, workdir=training.root / "runs", min_nodes=len(REGIONS)
    )
    wall = time.monotonic() - started
    print(f"training: {wall:.1f} s for {model.steps} steps; {trained.result['steps']}")
    assert not trained.result["partial"]
    assert len(trained.rounds) == ROUNDS
    central, ours = _central(training.folders, model, trained.coefficients)
    print(
        f"held-out AUC: central {central:.4f}, DP exact {ours:.4f}, "
        f"DP noisy {trained.held_out_auc:.4f}"
    )
    assert ours > central - AUC_MARGIN
    # The released AUC is the DP model's exact one up to binning (under 0.005 at 30 bins)
    # and the histograms' noise, whose sd the result states: within 0.005 + 5 sd (a false
    # failure below 6e-7 if the stated sd is right; tests/unit/test_descent.py checks it).
    sd = trained.result["held_out_auc_noise_sd"]
    assert 0 < sd < 0.05
    assert abs(trained.held_out_auc - ours) < 0.005 + 5 * sd
    # Every node charged the model's rho, one ledger entry per step (design, rounds, eval).
    for name, rho in trained.rho_charged.items():
        assert rho == pytest.approx(RHO, rel=1e-6), name
    entries = _ledger_entries(training.fed)
    for name in REGIONS:
        steps = [
            b["fit"]["step"]  # type: ignore[index]
            for b in entries[name]
            if b.get("fit") and b.get("query_sha256") == trained.result["query_sha256"]
        ]
        assert sorted(steps) == list(range(model.steps)), (name, steps)
    saved = trained.save(training.root / "model.json")
    provenance = json.loads(saved.read_text())
    assert provenance["model"]["view"] == synth.KNOWN_PATHWAY
    assert {n["node"] for n in provenance["nodes"]} == set(REGIONS)
    _verify(training.fed)


def test_a_killed_supernode_stops_the_run_with_a_clear_message_and_the_ledgers_verify(
    training: Training,
) -> None:
    model = _model(rounds=20)
    envelope = sign_training(load_identity(training.fed.analyst_identity), model)
    victim = training.supernodes["nwc"]
    # Kill it once the run has begun charging (its ledger grows), mid-training.
    import threading

    before = len(_ledger_entries(training.fed)["nwc"])

    def kill_when_charging() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(_ledger_entries(training.fed)["nwc"]) >= before + 3:
                victim.kill()
                return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_when_charging, daemon=True)
    killer.start()
    started = time.monotonic()
    with pytest.raises(TrainingFailedError, match="training stopped at step") as info:
        train_over_flower(
            training.link,
            envelope,
            workdir=training.root / "runs",
            min_nodes=len(REGIONS),
            step_deadline_s=30.0,
        )
    stopped = time.monotonic() - started
    killer.join(timeout=1)
    message = str(info.value)
    assert "nwc" in message
    assert "charged so far" in message
    print(f"stopped after {stopped:.1f} s: {message}")
    # No ledger is corrupted: both verify, and nwc has no entry after its last answer.
    _verify(training.fed)
    # Bring nwc's SuperNode back for the tests after this one (its key is still registered).
    victim.start()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        online = [n for n in training.link.nodes() if str(n.get("status", "")).lower() == "online"]
        if len(online) >= len(REGIONS):
            break
        time.sleep(1)


def test_a_small_network_trains_over_flower_to_the_central_logistic_ranking(
    training: Training,
) -> None:
    """hidden=8 tanh units, per-person clipped gradients, Adam at the hub, 10 rounds."""
    model = dataclasses.replace(_model(rounds=10), hidden=8, clip=1.0)
    envelope = sign_training(load_identity(training.fed.analyst_identity), model)
    trained = train_over_flower(
        training.link, envelope, workdir=training.root / "runs", min_nodes=len(REGIONS)
    )
    assert not trained.result["partial"], trained.result["left_out"]
    assert len(trained.rounds) == 10
    names = mlp.names(known_design_columns(model), 8)
    assert sorted(trained.coefficients) == sorted(names)
    theta = np.array([trained.coefficients[n] for n in names])  # in the vector's order
    central, _ = _central(training.folders, _model(), {c: 0.0 for c in known_design_columns(model)})
    ours = _network_auc(training.folders, model, theta)
    print(
        f"held-out AUC: central logistic {central:.4f}, DP network exact {ours:.4f}, "
        f"released {trained.held_out_auc:.4f}"
    )
    # Margin: the network's ranking is the logistic model's to within 0.03 after 10 noisy
    # rounds (measured: about 0.01 below); the released estimate as for the logistic model.
    assert ours > central - 0.03
    sd = trained.result["held_out_auc_noise_sd"]
    assert abs(trained.held_out_auc - ours) < 0.005 + 5 * sd
    for name, rho in trained.rho_charged.items():
        assert rho == pytest.approx(RHO, rel=1e-6), name
    _verify(training.fed)


def known_design_columns(model: ModelSpec) -> tuple[str, ...]:
    """The model's design columns, as the nodes' catalog gives them."""
    from queries.model import design_columns

    return design_columns(model, cohort_view(known_pathway()), list(REGIONS))


def _network_auc(folders: dict[str, Path], model: ModelSpec, theta: np.ndarray) -> float:
    _, x, y, held = _held_out_design(folders, model)
    return _auc(y[held], mlp.logits(theta, x[held], model.hidden))
