"""A fit across the hub's nodes: each step fanned out with one deadline, summed, solved.

Step 0 (the design check) goes to every configured node; a node that refuses it or does not
answer is left out and the fit is partial. Steps 1..K go to the nodes that passed step 0,
and any failure there stops the fit: a step released by some nodes only would be biased,
and going on would charge the others for a fit nobody gets. A compare_by model then takes
its expected step at the final coefficients (coordinator/learning/units.py sums its units).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

import grpc

from coordinator.hub.fanout import Reply, fan_out, unanimous_refusal
from coordinator.hub.registry import NodeHandle
from coordinator.learning.charges import Charges
from coordinator.learning.fit import solve
from coordinator.learning.units import unit_totals
from protocols import serde, serde_fit
from protocols.v1 import node_pb2
from queries.errors import ChcError, DataError
from queries.fitted import FittedModel, NodeTotals, UnitTotals
from queries.model import ModelSpec, StepRelease
from queries.results import NodeOutcome, NodeStatus, ReleaseRules

log = logging.getLogger(__name__)


class FitStoppedError(ChcError):
    """A node failed after the design check: the fit stopped, nothing more is charged."""

    status_name = "ABORTED"


class NoNodeFitsError(ChcError):
    """Every node refused the design check, for the same kind of reason."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status_name = code.name


def _release(reply: Reply[object], step: int) -> tuple[node_pb2.FitStepResponse, StepRelease]:
    if not isinstance(reply.value, node_pb2.FitStepResponse):
        raise DataError(f"node {reply.node} sent no fit step")
    release = serde_fit.step_release_from_proto(reply.value, reply.node)
    if release.step != step:
        raise DataError(f"node {reply.node} answered step {release.step}, asked for {step}")
    return reply.value, release


def _step(
    handles: Sequence[NodeHandle],
    envelope: node_pb2.QueryEnvelope,
    step: int,
    coefficients: Sequence[float],
    regions: Sequence[str],
    deadline_s: float,
) -> list[Reply[object]]:
    request = node_pb2.FitStepRequest(
        envelope=envelope, step=step, coefficients=list(coefficients), regions=list(regions)
    )
    # Retried while a node is unreachable: a node answers the very same request again with
    # the release it kept for it, charged once (protocol 1.3; an earlier node refuses the
    # retry as a replay, at no cost).
    return fan_out(handles, "FitStep", request, deadline_s=deadline_s)


def fit_across(
    handles: Sequence[NodeHandle],
    envelope: node_pb2.QueryEnvelope,
    model: ModelSpec,
    *,
    deadline_s: float,
    analyst: str = "",
    rules: ReleaseRules | None = None,
) -> FittedModel:
    """Run every step of a fit at the nodes and solve it at the hub."""
    query_id = uuid.uuid4().hex
    effective = rules or ReleaseRules()
    regions = [h.entry.name for h in handles]
    charges = Charges()
    replies = _step(handles, envelope, 0, (), regions, deadline_s)
    design: list[StepRelease] = []
    left_out: dict[str, Reply[object]] = {}
    for r in replies:
        if r.status is NodeStatus.OK:
            msg, release = _release(r, 0)
            charges.record(r.node, msg, release)
            design.append(release)
            if msg.HasField("release_rules"):
                effective = effective.strictest(serde.rules_from_proto(msg.release_rules))
        else:
            left_out[r.node] = r
    log.info(
        "fit %s from %s, design check: %s",
        query_id,
        analyst,
        ", ".join(f"{r.node}={r.status.value} in {r.latency_ms:.0f} ms" for r in replies),
    )
    if not design:
        if (refusal := unanimous_refusal(replies)) is not None:
            code, messages = refusal
            raise NoNodeFitsError(code, "every node refused the fit: " + messages)
        # As for a query: the analyst gets every node's fate and no coefficients.
        return FittedModel(
            query_id=query_id,
            family=model.family,
            link=model.link,
            coefficients=(),
            iterations=(),
            nodes=tuple(_outcome(r.node, charges, left_out) for r in replies),
            partial=True,
            persons=0,
            message="no node answered the design check: "
            + "; ".join(f"{r.node}: {r.message}" for r in replies),
        )
    fitting = [h for h in handles if h.entry.name not in left_out]
    last: list[StepRelease] = []
    sent: list[float] = []

    def ask(step: int, coefficients: Sequence[float]) -> list[StepRelease]:
        replies = _step(fitting, envelope, step, coefficients, regions, deadline_s)
        out = []
        # Every release is recorded before any failure is reported: those nodes were charged.
        for r in replies:
            if r.status is NodeStatus.OK:
                msg, release = _release(r, step)
                charges.record(r.node, msg, release)
                out.append(release)
        failed = [r for r in replies if r.status is not NodeStatus.OK]
        if failed:
            # A node whose call may have reached it may have charged this step: never a
            # silent 0 in what the analyst is told.
            unknown = [
                r.node for r in failed if r.status is NodeStatus.TIMED_OUT or r.may_have_arrived
            ]
            maybe = (
                f"; whether {', '.join(unknown)} charged step {step} is not known (the call "
                "may have reached it): `chc budget` shows every charge"
                if unknown
                else ""
            )
            raise FitStoppedError(
                f"the fit stopped at step {step} of {model.steps - 1}: "
                + "; ".join(f"node {r.node} {r.status.value} ({r.message})" for r in failed)
                + f"; {charges.summary()}{maybe}; nothing more is charged, and the steps "
                "already charged stay in each node's ledger"
            )
        if step != model.expected_step:
            last[:], sent[:] = out, list(coefficients)
        return out

    units: tuple[UnitTotals, ...] = ()
    try:
        # Every step names the design check's regions (each node checks they stay the same).
        fit_regions = [h.entry.name for h in fitting]
        solution = solve(model, design, fit_regions, ask, all_regions=regions)
        if model.expected_step is not None:
            units = unit_totals(design, ask(model.expected_step, solution.beta), effective)
    except FitStoppedError:
        raise
    except ChcError as exc:
        # The same error, and what the fit has cost so far, since steps were charged.
        exc.args = (f"{exc}; the fit stopped, {charges.summary()}",)
        raise
    message = solution.message
    if left_out:
        message += "; partial: left out after the design check: " + "; ".join(
            f"{n} ({r.status.value}: {r.message})" for n, r in left_out.items()
        )
    return FittedModel(
        query_id=query_id,
        family=model.family,
        link=model.link,
        coefficients=solution.coefficients,
        iterations=solution.iterations,
        nodes=tuple(_outcome(n, charges, left_out) for n in regions),
        partial=bool(left_out),
        persons=solution.persons,
        message=message,
        # With units, no per-node total: a suppressed unit would be one subtraction away.
        node_totals=(totals := () if units else _totals(design, last)),
        totals_coefficients=tuple(sent) if totals else (),
        unit_totals=units,
        compare_by=model.compare_by or "",
    )


def _totals(design: Sequence[StepRelease], last: Sequence[StepRelease]) -> tuple[NodeTotals, ...]:
    """Per node: the design check's outcome sum and the last step's intercept gradient."""
    outcome = {r.node: r for r in design}
    out = []
    for r in last:
        if "gradient" not in r.vectors or r.node not in outcome:
            return ()  # a Gaussian fit's one step has no sum of y - mu
        check = outcome[r.node]
        out.append(
            NodeTotals(
                node=r.node,
                outcome_sum=check.vectors["outcome_sum"][0],
                outcome_variance=check.variances["outcome_sum"],
                residual_sum=r.vectors["gradient"][0],
                residual_variance=r.variances["gradient"],
                step=r.step,
            )
        )
    return tuple(out)


def _outcome(node: str, charges: Charges, left_out: dict[str, Reply[object]]) -> NodeOutcome:
    reply = left_out.get(node)
    if reply is not None:
        return NodeOutcome(
            node=node, status=reply.status, message=reply.message, rho_charged=reply.rho_charged
        )
    return NodeOutcome(
        node=node,
        status=NodeStatus.OK,
        rho_charged=charges.rho.get(node, 0.0),
        budget=charges.budget.get(node),
        node_query_id=charges.query_id.get(node, ""),
        ledger_sequence=charges.last_entry(node),
    )
