"""Fit steps in the ledger: the entry's `fit` field, what the auditor accepts and flags, and
what a restarted node remembers (nonces per step).

The auditor accepts up to `steps` entries per fit envelope with distinct steps, and flags a
repeated step, a total over the model's rho, wrong coefficients, a step after a refused
design check, and a fit step under an envelope signed for something else.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from coordinator.audit.verification import verify
from node.budget.accounting import Charge, MemoryAccountant
from node.guards import NonceStore, fit_key
from protocols import serde
from protocols.budget.policy import BudgetPolicy
from protocols.ledger.entry import FitStepRecord, decode_body, read_fit
from protocols.security.envelope import Operation, sign_query
from protocols.security.pki import Identity
from protocols.v1 import node_pb2
from queries.errors import AuthenticationError
from queries.mechanisms import rho_to_epsilon
from queries.model import Covariate, Family, ModelSpec
from queries.model_io import model_bytes
from tests.unit._accounting_helpers import Pki, make_pki, signed_charge, source_of

MODEL = ModelSpec(
    view="copd",
    outcome="admitted",
    family=Family.BINOMIAL,
    covariates=(Covariate("sex"),),
    rho=1.0,
    iterations=2,
)
COLUMNS = ("(intercept)", "sex[male]", "sex[unknown]")
SHARES = (0.05, 0.475, 0.475)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _envelope(who: Identity, operation: Operation = Operation.FIT) -> tuple[bytes, bytes]:
    signed = sign_query(who, model_bytes(MODEL), operation=operation)
    wire = serde.signed_query_to_proto(signed).SerializeToString(deterministic=True)
    return signed.query, wire


def _step(query: bytes, envelope: bytes, who: Identity, k: int, **fit: object) -> Charge:
    record = FitStepRecord(
        step=k,
        steps=MODEL.steps,
        columns=COLUMNS,
        coefficients=(0.1, 0.2, 0.3) if k else (),
        regions=(),
    )
    rho = float(fit.pop("rho", SHARES[min(k, 2)]))  # type: ignore[arg-type]
    return Charge(
        query_id=f"fit-{k}",
        analyst=who.name,
        query=query,
        envelope=envelope,
        views=(MODEL.view,),
        rho=rho,
        epsilon=rho_to_epsilon(rho, 1e-6),
        fit=replace(record, **fit),  # type: ignore[arg-type]
    )


def _ledger(charges: list[Charge]) -> MemoryAccountant:
    ledger = MemoryAccountant(BudgetPolicy(total_rho=100.0, max_rho_per_query=5.0))
    for c in charges:
        ledger.charge(c)
    return ledger


def _problems(ledger: MemoryAccountant, pki: Pki) -> list[str]:
    return [a.problem for a in verify(source_of(ledger), ca_pem=pki.ca_pem).anomalies]


def test_every_step_of_a_fit_verifies_beside_queries(pki: Pki) -> None:
    q, e = _envelope(pki.alice)
    steps = [_step(q, e, pki.alice, k) for k in range(MODEL.steps)]
    ledger = _ledger([signed_charge(pki.bob, 0.1), *steps, signed_charge(pki.bob, 0.1)])
    assert _problems(ledger, pki) == []
    bodies = [decode_body(x.body) for x in ledger.entries()]
    fits = [read_fit(b) for b in bodies]
    assert [f.step for f in fits if f is not None] == [0, 1, 2]
    assert all("fit" not in b for b, f in zip(bodies, fits, strict=True) if f is None)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({2: {"step": 1}}, "replays step 1 of the fit already released as entry"),
        ({2: {"rho": 0.6}}, "above the model's rho 1"),
        ({1: {"coefficients": ()}}, "must record the 3 finite coefficient(s)"),
        ({1: {"step": 5}}, "records step 5 of 3, but the model has steps 0 to 2"),
        ({0: {"refused": "design: too few"}}, "releases step 1 of a fit the node refused"),
    ],
)
def test_the_auditor_flags_what_a_fit_must_not_do(
    pki: Pki, changes: dict[int, dict[str, object]], problem: str
) -> None:
    q, e = _envelope(pki.alice)
    steps = [_step(q, e, pki.alice, k, **changes.get(k, {})) for k in range(MODEL.steps)]
    found = _problems(_ledger(steps), pki)
    assert any(problem in p for p in found), found


def test_a_fit_step_under_an_execute_envelope_is_flagged(pki: Pki) -> None:
    q, e = _envelope(pki.alice, Operation.EXECUTE)
    found = _problems(_ledger([_step(q, e, pki.alice, 0)]), pki)
    assert any("not to fit a model" in p for p in found), found


def test_a_restarted_node_refuses_each_released_step_again(pki: Pki) -> None:
    q, e = _envelope(pki.alice)
    ledger = _ledger([_step(q, e, pki.alice, 0), _step(q, e, pki.alice, 1)])
    nonces = NonceStore()
    assert nonces.seed(ledger.entries()) == 2
    nonce = node_pb2.QueryEnvelope.FromString(e).nonce
    for k in (0, 1):
        with pytest.raises(AuthenticationError, match="already"):
            nonces.claim(fit_key(nonce, k), 2**62, replayed="already released")
    nonces.claim(fit_key(nonce, 2), 2**62)  # the next step is still open
    nonces.claim(nonce, 2**62)  # and the envelope's own nonce was never claimed by a step


def test_an_old_entry_without_a_fit_field_reads_as_a_query(pki: Pki) -> None:
    ledger = _ledger([signed_charge(pki.alice, 0.2)])
    body = decode_body(list(ledger.entries())[-1].body)
    assert read_fit(body) is None
    with pytest.raises(ValueError, match="fit field"):
        read_fit({"fit": {"step": "0"}})
