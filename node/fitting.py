"""The node side of a model fit: each step verified, planned, computed, charged, then noised.

A fit envelope (operation FIT) signs a model spec (queries/model.py); the hub asks every node
for its steps in turn (Node.FitStep). For each step the node, as for a query
(node/service.py): plans it from public information (queries/model_plan.py) and checks the
budget (at step 0 for the WHOLE fit, so a fit that cannot finish within the caps is refused
before anything is charged), claims the (envelope, step) nonce, computes the exact sums in
DuckDB (queries/model_sql.py), adds discrete Gaussian noise, and, for the design check,
applies its custodian's [models] policy to the noisy counts; then it charges the ledger (one
entry per step, recording the step and the hub's coefficients) and only then releases.

A design check the policy refuses is charged (its noisy counts were drawn) and recorded in
its entry (`fit.refused`), its counts are not released, and every later step of the
envelope is refused at no cost. What a fit has done here is read back from the ledger when
the node starts, so a restart forgets neither a released step nor a refused design.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc

from node.access import AccessPolicy
from node.budget.accounting import Accountant, Charge, Keep, Kept
from node.config import ModelPolicy
from node.data.catalog import describe_cohort, with_cohort
from node.data.store import OmopStore
from node.fit_release import calibrate_step, decide_design, exact_step, noisy_vectors, step_noise
from node.guards import NonceStore, begin_or_kept, check_deadline, fit_key, kept_reply
from protocols import serde
from protocols.ledger.entry import FitStepRecord, SignedEntry, decode_body, read_fit
from protocols.security.envelope import SignedQuery, VerifiedAnalyst
from protocols.v1 import node_pb2
from queries import mechanisms
from queries.errors import AuthenticationError, ChcError, PermissionDeniedError, QueryError
from queries.model import ModelSpec
from queries.model_checks import check_coefficients
from queries.model_io import model_from_json
from queries.model_plan import ModelPlan, plan_model
from queries.results import ReleaseRules
from queries.schema import Catalog

log = logging.getLogger(__name__)


def _has_units(plan: ModelPlan, k: int) -> bool:
    return any(v.name.startswith("unit_") for v in plan.step(k).vectors)


class FitOrderError(ChcError):
    """A Newton step asked for before this node released the fit's design check."""

    status_name = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class FitState:
    """What a fit's design check left at this node."""

    columns: tuple[str, ...]
    regions: tuple[str, ...]
    refused: str  # why the node refuses the rest of the fit, or ""


class Fitter:
    """Serves FitStep and the Explain of fit envelopes for one node."""

    def __init__(
        self,
        *,
        name: str,
        store: OmopStore,
        catalog: Catalog,
        accountant: Accountant,
        nonces: NonceStore,
        policy: ModelPolicy,
        access: AccessPolicy,
        rules: ReleaseRules | None = None,
    ) -> None:
        self.name = name
        self.rules = rules or ReleaseRules()
        self.access = access
        self.store = store
        self.catalog = catalog
        self.accountant = accountant
        self.nonces = nonces
        self.policy = policy
        self._fits: dict[bytes, FitState] = {}  # by envelope nonce, once step 0 is charged
        self._lock = threading.Lock()
        self.seed(accountant.entries())

    def seed(self, entries: Iterable[SignedEntry]) -> int:
        """Remember every design check the ledger records (released or refused)."""
        seeded = 0
        for entry in entries:
            try:
                body = decode_body(entry.body)
                fit = read_fit(body)
                if fit is None or fit.step != 0 or body.get("outcome") != "released":
                    continue
                envelope = node_pb2.QueryEnvelope.FromString(base64.b64decode(body["envelope"]))
            except (ValueError, KeyError, TypeError):
                continue
            self._fits[envelope.nonce] = FitState(fit.columns, fit.regions, fit.refused)
            seeded += 1
        return seeded

    # planning -------------------------------------------------------------------------

    def plan(
        self, signed: SignedQuery, analyst: VerifiedAnalyst, regions: Sequence[str]
    ) -> tuple[ModelSpec, ModelPlan]:
        """Parse, authorise and plan a fit; touches no data."""
        model = model_from_json(signed.query)
        self.access.check(analyst=analyst.name, organisation=analyst.organisation, view=model.view)
        catalog = self.catalog
        if model.cohort is not None:
            self.store.settings.cohorts.check(model.cohort)
            catalog = with_cohort(catalog, model.cohort, mortality=self.store.mortality)
        return model, plan_model(model, catalog, node=self.name, regions=regions)

    def fit_rho(self, plan: ModelPlan) -> list[float]:
        """The rho OpenDP certifies for each step (what the ledger will be charged)."""
        return [sum(c.rho for c in calibrate_step(s)) for s in plan.steps]

    def explain(
        self, signed: SignedQuery, analyst: VerifiedAnalyst, regions: Sequence[str]
    ) -> node_pb2.ExplainResponse:
        """The whole fit's plan and the cost of every step; spends nothing."""
        model, plan = self.plan(signed, analyst, regions or signed.audience.nodes)
        costs = self.fit_rho(plan)
        total = sum(costs)
        # Public refusals are refused in Explain as at step 0: over the budget for the fit.
        self.accountant.check(analyst.name, total)
        text = plan.describe() + "\n" + self._policy_text()
        if model.cohort is not None:
            text += "\n" + describe_cohort(
                model.cohort, concept_ancestor=self.store.concept_ancestor
            )
        status = self.accountant.status(analyst.name)
        measures = [serde.measure_noise_to_proto(m) for s in plan.steps for m in step_noise(s)]
        return node_pb2.ExplainResponse(
            plan=text,
            measures=measures,
            rho=total,
            epsilon=mechanisms.rho_to_epsilon(total, status.delta),
            cells=plan.cells(),
            budget=serde.budget_to_proto(status),
        )

    def _policy_text(self) -> str:
        p = self.policy
        return (
            f"this node's [models] policy, applied to the design check's noisy counts: every "
            f"level (reference levels and a binomial outcome's events and non-events too) "
            f"has at least {p.min_level_persons} persons, and at most "
            f"{p.max_parameter_ratio:g} parameters per person; a fit refused on it costs "
            "only its design check"
        )

    # a step ---------------------------------------------------------------------------

    def step(
        self,
        signed: SignedQuery,
        verified: VerifiedAnalyst,
        request: node_pb2.FitStepRequest,
        context: grpc.ServicerContext,
    ) -> node_pb2.FitStepResponse:
        """Verify, plan, check the budget, compute, charge, then release one step.

        Idempotent, as Execute is: the very same request again (a retry after a lost reply)
        is answered with the release kept for it, marked `resent`, and charged nothing more.
        """
        model, plan = self.plan(signed, verified, request.regions)
        k = request.step
        if not 0 <= k < model.steps:
            raise QueryError(
                f"step: {k} is not a step of this fit, which has steps 0 to {model.steps - 1} "
                f"(the design check, then {model.newton_steps} Newton step(s))"
            )
        if k > 0:
            self._check_order(signed.nonce, plan, k)
        coefficients = check_coefficients(plan, k, list(request.coefficients))
        calibrations = calibrate_step(plan.step(k))
        rho = sum(c.rho for c in calibrations)
        key, digest = fit_key(signed.nonce, k), _request_digest(request)
        try:
            kept = begin_or_kept(
                self.nonces,
                key,
                digest,
                context,
                self.accountant.stored_release,
                replayed=f"step: step {k} of this fit was already released by this node; "
                "each step of a fit envelope is answered once (sign the model again to refit)",
            )
        except AuthenticationError:
            if k == 0:
                self._refused_again(signed.nonce, rho)
            raise
        if kept is not None:
            return self._resent(kept, k)
        attempt = _Attempt(context, digest)
        try:
            return self._run(
                signed, verified.name, request, model, plan, coefficients, calibrations, attempt
            )
        finally:
            self.nonces.finish(key, signed.expires_at_ms, charged=attempt.charged)

    def _run(
        self,
        signed: SignedQuery,
        analyst: str,
        request: node_pb2.FitStepRequest,
        model: ModelSpec,
        plan: ModelPlan,
        coefficients: tuple[float, ...],
        calibrations: Sequence[mechanisms.Calibration],
        attempt: _Attempt,
    ) -> node_pb2.FitStepResponse:
        """Check the budget, compute, charge (keeping the release), then release the step."""
        k, context = request.step, attempt.context
        rho = sum(c.rho for c in calibrations)
        # At the design check the whole fit must fit in every cap: refuse it now, at no cost,
        # rather than after charging steps whose fit could never finish.
        self.accountant.check(analyst, sum(self.fit_rho(plan)) if k == 0 else rho)
        query_id = uuid.uuid4().hex
        started = time.perf_counter()
        check_deadline(context, "before computing")
        noisy = self._compute(plan, k, coefficients, calibrations)
        refused = decide_design(plan, noisy, self.policy) if k == 0 else ""
        epsilon = mechanisms.rho_to_epsilon(rho, self.accountant.policy.delta)
        # Built before the charge, so that the kept copy is stored in the charge's own
        # transaction; the budget and ledger sequence are filled in after it.
        msg = node_pb2.FitStepResponse(
            query_id=query_id,
            step=k,
            columns=list(plan.columns),
            statistics=noisy_vectors(plan, k, noisy, calibrations),
            rho_charged=rho,
            epsilon=epsilon,
            units=list(plan.units) if _has_units(plan, k) else [],
            release_rules=serde.rules_to_proto(self.rules),
        )
        keep = None
        if not refused:
            keep = Keep(
                envelope_sha256=attempt.digest,
                expires_at_ms=signed.expires_at_ms,
                response=msg.SerializeToString(),
            )
        check_deadline(context, "before charging")
        record = FitStepRecord(
            step=k,
            steps=model.steps,
            columns=plan.columns,
            coefficients=coefficients,
            regions=plan.regions,
            refused=refused,
        )
        budget, sequence = self.accountant.charge(
            Charge(
                query_id=query_id,
                analyst=analyst,
                query=signed.query,
                envelope=request.envelope.SerializeToString(deterministic=True),
                views=(model.view,),
                rho=rho,
                epsilon=epsilon,
                fit=record,
            ),
            keep,
        )
        attempt.charged = True
        if k == 0:
            with self._lock:
                self._fits[signed.nonce] = FitState(plan.columns, plan.regions, refused)
        log.info(
            "fit %s step %d from %s: view=%s rho=%.6g in %.1f ms (ledger #%d)%s",
            query_id,
            k,
            analyst,
            model.view,
            rho,
            (time.perf_counter() - started) * 1000,
            sequence,
            " design refused" if refused else "",
        )
        if refused:
            error = PermissionDeniedError(
                f"{refused}; the design check was charged (rho {rho:.4g}), no later step of "
                "this fit will be: change the model (merge small levels, fewer covariates) "
                "and sign it again"
            )
            error.rho_charged = rho
            raise error
        msg.budget.CopyFrom(serde.budget_to_proto(budget))
        msg.ledger_sequence = sequence
        return msg

    def _resent(self, kept: Kept, k: int) -> node_pb2.FitStepResponse:
        """The release kept for a step's request, marked resent, with today's budget."""
        msg = kept_reply(kept, node_pb2.FitStepResponse, self.accountant.status())
        log.info(
            "fit %s step %d: re-sent the kept release of ledger entry %d (nothing charged)",
            msg.query_id,
            k,
            kept.sequence,
        )
        return msg

    def _refused_again(self, nonce: bytes, rho: float) -> None:
        """A design check asked again that this node refused (charged) when first asked:
        the same refusal, saying it was charged once; nothing if it was not refused."""
        with self._lock:
            state = self._fits.get(nonce)
        if state is None or not state.refused:
            return
        error = PermissionDeniedError(
            f"{state.refused}; the design check was charged (rho {rho:.4g}) when first asked, "
            "not again, and no later step of this fit will be: change the model (merge small "
            "levels, fewer covariates) and sign it again"
        )
        error.rho_charged = rho
        raise error

    def _check_order(self, nonce: bytes, plan: ModelPlan, k: int) -> None:
        with self._lock:
            state = self._fits.get(nonce)
        if state is None:
            raise FitOrderError(
                f"step: step {k} asked for before this node released the fit's design check "
                "(step 0); ask for step 0 first"
            )
        if state.refused:
            raise PermissionDeniedError(
                f"this node refused this fit at its design check ({state.refused}); no later "
                "step is charged or released"
            )
        if state.regions != plan.regions or state.columns != plan.columns:
            raise QueryError(
                f"regions: step {k} names regions {list(plan.regions)}, but the design check "
                f"was planned with {list(state.regions)}; send the same regions at every step"
            )

    def _compute(
        self,
        plan: ModelPlan,
        k: int,
        coefficients: tuple[float, ...],
        calibrations: Sequence[mechanisms.Calibration],
    ) -> dict[str, tuple[int, ...]]:
        """The step's noisy integers (exact sums then noise), before any charge.

        As for a query (NodeService._release), a failure here charges nothing and logs only
        the exception's type: its message could carry an exact value.
        """
        try:
            with self.store.snapshot() as views:
                if plan.model.cohort is None:
                    exact = exact_step(views, plan, k, coefficients)
                else:
                    if views.cohorts is None:
                        raise QueryError("this node's views keep nothing for ad hoc cohorts")
                    with views.cohorts.runner(plan.model.cohort) as runner:
                        exact = exact_step(runner, plan, k, coefficients)
            noisy = {
                v.name: mechanisms.add_noise(c, exact[v.name])
                for v, c in zip(plan.step(k).vectors, calibrations, strict=True)
            }
            del exact  # nothing exact outlives this function
            return noisy
        except ChcError:
            raise
        except Exception as exc:
            ref = uuid.uuid4().hex[:12]
            log.error("fit step failed (ref %s): %s; nothing was charged", ref, type(exc).__name__)
            raise ChcError(
                f"internal error computing the fit step (ref {ref}); nothing was charged"
            ) from None


@dataclass
class _Attempt:
    """One FitStep call's part in answering its request (see NonceStore.begin)."""

    context: grpc.ServicerContext
    digest: bytes  # the request's key among kept releases (_request_digest)
    charged: bool = False  # the charge is durable: the step's nonce stays claimed


def _request_digest(request: node_pb2.FitStepRequest) -> bytes:
    """The key of a step's kept release: the whole request (envelope, step, coefficients,
    regions), so that only the very same request reads it; tagged apart from Execute's keys
    (an envelope's SHA-256)."""
    return hashlib.sha256(
        b"chc-fit-step\x00" + request.SerializeToString(deterministic=True)
    ).digest()
