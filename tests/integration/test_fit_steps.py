"""The node side of a model fit over a real federation (mTLS on loopback, real DuckDB/OpenDP).

Each step is charged once at every node, appears in its ledger with the step and the hub's
coefficients, and the auditor's verification passes; the very same step request again is
answered with the release kept for it, while replayed and out-of-range steps are refused,
all at no cost; refusals from public information cost nothing; refusals of the node's
[models] policy (decided on the design check's noisy counts) cost only the design check.
The steps are driven by a test-only hub loop (tests/integration/_fit_driver.py).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import grpc
import pytest

from coordinator.audit.sources import open_remote
from coordinator.audit.verification import verify
from coordinator.local import synth
from coordinator.local.federation import AUDITOR_NAME, LocalFederation, NodeSetup
from protocols import serde
from protocols.security.envelope import Operation, sign_query
from protocols.security.pki import CA_FILE, Role, load_identity
from protocols.v1 import node_pb2
from queries.model import Covariate, Family, ModelSpec
from queries.model_io import model_bytes
from queries.model_plan import DESIGN_CHECK_SHARE
from queries.spec import Filter
from tests.integration._fit_driver import fit_envelope, node_stubs, run_fit, step

pytestmark = pytest.mark.integration

PERSONS = 20_000
FITTING = ("nenc", "nwc")
# yh refuses every design (no level has a million persons); gm allows almost no parameters.
POLICIES = {
    "yh": "[models]\nmin_level_persons = 1000000\n",
    "gm": "[models]\nmax_parameter_ratio = 0.0001\n",
}
TWO_SEXES = (Filter("sex", ("female", "male")),)


def _model(**kw: object) -> ModelSpec:
    base: dict[str, object] = {
        "view": "copd",
        "outcome": "admitted",
        "family": Family.BINOMIAL,
        "covariates": (Covariate("sex"), Covariate("age")),
        "rho": 20.0,
        "where": TWO_SEXES,
        "iterations": 3,
    }
    base.update(kw)
    return ModelSpec(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("fit")
    folders = synth.generate_federation(PERSONS, root / "data", seed=7)
    setups = tuple(
        NodeSetup(
            name=r.slug,
            omop=folders[r.slug],
            total_rho=1000.0,
            max_rho_per_query=50.0,
            extra_toml=POLICIES.get(r.slug, ""),
        )
        for r in synth.REGIONS
    )
    with LocalFederation(workdir=root, nodes=setups, deadline_ms=30_000) as federation:
        yield federation


def _spent(fed: LocalFederation, node: str) -> float:
    stub = node_stubs(fed, [node])[node]
    return float(stub.Describe(node_pb2.DescribeRequest(), timeout=10).budget.rho_spent)


def _ledger(fed: LocalFederation, node: str) -> list[dict[str, object]]:
    auditor = load_identity(fed.identity_dir(Role.AUDITOR, AUDITOR_NAME))
    source = open_remote(node, f"127.0.0.1:{fed.node_port(node)}", auditor)
    ca = (fed.pki / CA_FILE).read_bytes()
    result = verify(source, ca_pem=ca)
    assert result.ok, result.anomalies
    source = open_remote(node, f"127.0.0.1:{fed.node_port(node)}", auditor)
    return [json.loads(e.body) for e in source.read() if not e.head]


def _fit_entries(entries: list[dict[str, object]], envelope: node_pb2.QueryEnvelope) -> list:
    out = []
    for body in entries:
        raw = body.get("envelope")
        if not (body.get("fit") and isinstance(raw, str)):
            continue
        if node_pb2.QueryEnvelope.FromString(base64.b64decode(raw)).nonce == envelope.nonce:
            out.append(body)
    return out


def _refused(call: object) -> grpc.RpcError:
    assert isinstance(call, grpc.RpcError)
    return call


def test_each_step_is_charged_once_at_every_node_and_the_ledgers_verify(
    fed: LocalFederation,
) -> None:
    model = _model(region=True)
    stubs = node_stubs(fed, FITTING)
    before = {n: _spent(fed, n) for n in FITTING}
    envelope = fit_envelope(fed, model)
    fit = run_fit(stubs, envelope, model)
    assert fit.columns == ("(intercept)", "sex[male]", "age", "region[nwc]")
    for name in FITTING:
        entries = _fit_entries(_ledger(fed, name), envelope)
        assert [e["fit"]["step"] for e in entries] == list(range(model.steps))  # type: ignore[index]
        for e in entries:
            k = e["fit"]["step"]  # type: ignore[index]
            assert e["fit"]["coefficients"] == fit.sent.get(k, [])  # type: ignore[index]
            assert e["fit"]["regions"] == list(FITTING)  # type: ignore[index]
        total = sum(float(e["rho"]) for e in entries)  # type: ignore[arg-type]
        # OpenDP certifies at most what was asked for; the steps spend the model's rho.
        assert total == pytest.approx(model.rho, rel=1e-6)
        assert total <= model.rho * (1 + 1e-9)
        assert _spent(fed, name) - before[name] == pytest.approx(total, rel=1e-9)
    design = fit.responses[0]["nwc"]
    assert design.rho_charged == pytest.approx(DESIGN_CHECK_SHARE * model.rho, rel=1e-6)
    names = [v.name for v in design.statistics]
    assert names == ["n", "level_counts", "outcome_sum"]
    # The very same step request again (a retry after a lost reply) reads the release kept
    # for it; the step with other coefficients, and a step past the last, are refused; none
    # of them costs anything.
    spent = _spent(fed, "nenc")
    first = fit.responses[1]["nenc"]
    again = step({"nenc": stubs["nenc"]}, envelope, 1, fit.sent[1], FITTING)["nenc"]
    assert again.resent
    assert not first.resent
    assert (again.query_id, again.ledger_sequence) == (first.query_id, first.ledger_sequence)
    assert list(again.statistics) == list(first.statistics)
    assert again.rho_charged == first.rho_charged
    other = [c + 0.5 for c in fit.sent[1]]
    with pytest.raises(grpc.RpcError) as replay:
        step({"nenc": stubs["nenc"]}, envelope, 1, other, FITTING)
    assert _refused(replay.value).code() is grpc.StatusCode.UNAUTHENTICATED
    assert "step 1 of this fit was already released" in str(replay.value.details())
    with pytest.raises(grpc.RpcError) as past:
        step({"nenc": stubs["nenc"]}, envelope, model.steps, fit.sent[1], FITTING)
    assert _refused(past.value).code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"steps 0 to {model.steps - 1}" in str(past.value.details())
    assert _spent(fed, "nenc") == spent
    _ledger(fed, "nenc")  # still verifies with the refusals recorded


def test_public_refusals_cost_nothing_and_name_the_problem(fed: LocalFederation) -> None:
    stub = node_stubs(fed, ["nenc"])
    spent = _spent(fed, "nenc")
    cases = [
        (_model(outcome="nope"), grpc.StatusCode.INVALID_ARGUMENT, "no column 'nope'"),
        (_model(outcome="admissions"), grpc.StatusCode.INVALID_ARGUMENT, "a binomial outcome"),
        (_model(rho=60.0), grpc.StatusCode.INVALID_ARGUMENT, "per-query cap"),
    ]
    for model, code, text in cases:
        with pytest.raises(grpc.RpcError) as info:
            step(stub, fit_envelope(fed, model), 0, [])
        assert _refused(info.value).code() is code, info.value.details()
        assert text in str(info.value.details())
    # A Newton step before the design check, and an envelope signed for something else.
    model = _model()
    with pytest.raises(grpc.RpcError) as early:
        step(stub, fit_envelope(fed, model), 1, [0.0] * 3)
    assert _refused(early.value).code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "before this node released the fit's design check" in str(early.value.details())
    analyst = load_identity(fed.analyst_identity)
    executable = serde.signed_query_to_proto(sign_query(analyst, model_bytes(model)))
    with pytest.raises(grpc.RpcError) as wrong:
        step(stub, executable, 0, [])
    assert _refused(wrong.value).code() is grpc.StatusCode.UNAUTHENTICATED
    # A fit envelope never executes (this was an INTERNAL error: no wording for "fit").
    with pytest.raises(grpc.RpcError) as run:
        stub["nenc"].Execute(node_pb2.ExecuteRequest(envelope=fit_envelope(fed, model)), timeout=30)
    assert _refused(run.value).code() is grpc.StatusCode.UNAUTHENTICATED, run.value.details()
    assert _spent(fed, "nenc") == spent


def test_design_refusals_cost_only_the_design_check(fed: LocalFederation) -> None:
    for node, rule in (("yh", "min_level_persons"), ("gm", "max_parameter_ratio")):
        stub = node_stubs(fed, [node])
        model = _model()
        envelope = fit_envelope(fed, model)
        spent = _spent(fed, node)
        with pytest.raises(grpc.RpcError) as design:
            step(stub, envelope, 0, [])
        assert _refused(design.value).code() is grpc.StatusCode.PERMISSION_DENIED
        assert rule in str(design.value.details())
        charged = _spent(fed, node) - spent
        assert charged == pytest.approx(DESIGN_CHECK_SHARE * model.rho, rel=1e-6)
        with pytest.raises(grpc.RpcError) as later:
            step(stub, envelope, 1, [0.0] * 3)
        assert _refused(later.value).code() is grpc.StatusCode.PERMISSION_DENIED
        assert "refused this fit at its design check" in str(later.value.details())
        assert _spent(fed, node) - spent == pytest.approx(charged, rel=1e-12)
        entries = _fit_entries(_ledger(fed, node), envelope)
        assert [e["fit"]["step"] for e in entries] == [0]  # type: ignore[index]
        assert rule in entries[0]["fit"]["refused"]  # type: ignore[index]


def test_explain_shows_every_step_and_spends_nothing(fed: LocalFederation) -> None:
    stub = node_stubs(fed, ["nwc"])["nwc"]
    model = _model(region=True)
    spent = _spent(fed, "nwc")
    answer = stub.Explain(
        node_pb2.ExecuteRequest(envelope=fit_envelope(fed, model), regions=list(FITTING)),
        timeout=30,
    )
    assert "step 0, the design check" in answer.plan
    assert "region[nwc]: 1 (this node)" in answer.plan
    assert "at least 10 persons" in answer.plan  # this node's [models] policy
    assert answer.rho == pytest.approx(model.rho, rel=1e-6)
    steps = sorted({m.measure.split(":")[0] for m in answer.measures})
    assert steps == [f"step {k}" for k in range(model.steps)]
    assert all(m.noise.variance > 0 for m in answer.measures)
    with pytest.raises(grpc.RpcError) as over:
        stub.Explain(
            node_pb2.ExecuteRequest(envelope=fit_envelope(fed, _model(rho=60.0))), timeout=30
        )
    assert _refused(over.value).code() is grpc.StatusCode.INVALID_ARGUMENT
    assert _spent(fed, "nwc") == spent


def test_an_envelope_signed_to_explain_a_model_is_explained_and_never_fitted(
    fed: LocalFederation,
) -> None:
    # The analyst's `explain(model)` signs for explain, so no hub relaying it can run the fit.
    stub = node_stubs(fed, ["nwc"])["nwc"]
    model = _model()
    spent = _spent(fed, "nwc")
    envelope = fit_envelope(fed, model, Operation.EXPLAIN)
    answer = stub.Explain(node_pb2.ExecuteRequest(envelope=envelope), timeout=30)
    assert "step 0, the design check" in answer.plan
    with pytest.raises(grpc.RpcError) as refused:
        stub.FitStep(node_pb2.FitStepRequest(envelope=envelope, step=0), timeout=30)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "fit" in (refused.value.details() or "")
    assert _spent(fed, "nwc") == spent


def test_a_restarted_node_remembers_its_fits(fed: LocalFederation) -> None:
    model = _model(iterations=2)
    stubs = node_stubs(fed, ["nwc"])
    envelope = fit_envelope(fed, model)
    step(stubs, envelope, 0, [])
    first = step(stubs, envelope, 1, [0.0] * 3)["nwc"]
    fed.restart_node("nwc")
    stubs = node_stubs(fed, ["nwc"])
    # Its kept releases are in its ledger file: the same request reads the same release.
    again = step(stubs, envelope, 1, [0.0] * 3)["nwc"]
    assert again.resent
    assert again.ledger_sequence == first.ledger_sequence
    assert list(again.statistics) == list(first.statistics)
    with pytest.raises(grpc.RpcError) as replay:
        step(stubs, envelope, 1, [0.1] * 3)
    assert _refused(replay.value).code() is grpc.StatusCode.UNAUTHENTICATED
    last = step(stubs, envelope, 2, [0.0] * 3)["nwc"]  # the design check is remembered
    assert last.step == 2
    _ledger(fed, "nwc")
