"""`Federation`: the analysts' Python API to the hub."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
from google.protobuf.message import DecodeError

from coordinator.learning.result import FitResult
from coordinator.learning.trained import TrainedModel
from protocols import serde, serde_fit
from protocols.cli import read_capped
from protocols.retries import (
    HUB_CHANNEL_OPTIONS,
    RESEND_FIRST_BACKOFF_S,
    RESEND_MAX_BACKOFF_S,
    RESEND_MIN_LEFT_S,
    backoff_s,
)
from protocols.security.envelope import Audience, Operation, sign_query
from protocols.security.pki import Identity, load_identity
from protocols.security.tls import secure_channel
from protocols.v1 import hub_pb2, hub_pb2_grpc, node_pb2
from queries.errors import (
    AuthenticationError,
    BudgetExceededError,
    ChcError,
    ConfigError,
    PermissionDeniedError,
    QueryError,
    QuorumNotMetError,
)
from queries.model import ModelSpec
from queries.model_io import model_bytes
from queries.results import (
    BudgetStatus,
    Explanation,
    FederatedResult,
    NodeDescription,
    NodeOutcome,
    NodeStatus,
)
from queries.spec import Query, canonical_bytes

# Secure aggregation needs two nodes at least: with one, "the sum" is that node's value.
MIN_SECURE_NODES = 2

# A saved envelope is a query spec (at most spec_io.MAX_SPEC_BYTES), a certificate and a few
# fields; reading one stops one byte past this.
MAX_ENVELOPE_BYTES = 1024 * 1024


def save_envelope(envelope: node_pb2.QueryEnvelope, path: Path) -> None:
    """Write a signed envelope (serialised protobuf) for resend() later. It authorises only
    what it says (run once, charged once; re-sent at no cost) until it expires."""
    path.write_bytes(envelope.SerializeToString(deterministic=True))


def load_envelope(path: Path, *, flag: str = "envelope") -> node_pb2.QueryEnvelope:
    """A signed envelope written by save_envelope (bounded read); ConfigError if it is not."""
    raw = read_capped(
        path,
        MAX_ENVELOPE_BYTES,
        flag=flag,
        too_large="it is not an envelope saved by `chc query --save-envelope`",
    )
    try:
        envelope = node_pb2.QueryEnvelope.FromString(raw)
    except DecodeError:
        envelope = None
    if envelope is None or not envelope.signature or not envelope.query:
        raise ConfigError(
            f"{flag} {path} is not a signed query envelope: give a file written by "
            "`chc query --save-envelope FILE`"
        )
    return envelope


class HubUnavailableError(ConnectionError, ChcError):
    """The hub could not be reached or did not answer in time."""

    status_name = "UNAVAILABLE"


class FitStoppedError(ConnectionError, ChcError):
    """A node failed during a fit after its design check: the hub stopped the fit."""

    status_name = "ABORTED"


_ERRORS: dict[grpc.StatusCode, type[ChcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: QueryError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: BudgetExceededError,
    grpc.StatusCode.FAILED_PRECONDITION: ConfigError,
    # Only a fetch-only re-send is answered NOT_FOUND (nothing kept, nothing charged).
    grpc.StatusCode.NOT_FOUND: QueryError,
    grpc.StatusCode.UNAVAILABLE: HubUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: HubUnavailableError,
    grpc.StatusCode.ABORTED: FitStoppedError,
}


def _raise_from(exc: grpc.RpcError, hub: str, *, where: str = "") -> ChcError:
    """The ChcError for a failed call, with what to do when gRPC itself wrote the message.

    The hub's own refusals already say what to do; an unreachable or silent hub, or an error
    without a message, gets the advice here. where: how the address was found, if not given.
    """
    call = exc if isinstance(exc, grpc.Call) else None
    code = call.code() if call is not None else grpc.StatusCode.UNKNOWN
    details = (call.details() if call is not None else None) or code.name
    if code is grpc.StatusCode.UNAVAILABLE and details.startswith(QuorumNotMetError.PREFIX):
        return QuorumNotMetError(details)
    source = f" (from {where})" if where else ""
    running = "; is `chc demo --keep-running` still running?" if "`chc demo`" in where else ""
    if code is grpc.StatusCode.UNAVAILABLE:
        details = (
            f"cannot reach the hub at {hub}{source}: {details}; check that the hub is running "
            f"and the address is right{running}"
        )
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED:
        # Calls are retried while the hub is unreachable, so a hub that is down ends here too.
        details = (
            f"the hub at {hub}{source} did not answer in time ({details}): check that it is "
            f"running and the address is right{running}, or give a longer deadline"
        )
    elif code not in _ERRORS:
        details = (
            f"the hub at {hub} failed the call ({code.name}: {details}); try again, and if it "
            "persists ask the hub's operator to look at its log"
        )
    return _ERRORS.get(code, ChcError)(details)


def _resend_while_unavailable(
    submit: Callable[..., hub_pb2.SubmitResponse], request: hub_pb2.SubmitRequest, timeout: float
) -> hub_pb2.SubmitResponse:
    """Submit, and submit the same envelope again while the hub is unavailable (restarting,
    or not yet listening), until `timeout` has passed.

    Safe because nodes answer an envelope they have charged with the release they kept for it
    (docs/reliability.md); a quorum not met is not re-sent: the hub has already retried its
    nodes, and its message says what each answering node charged.
    """
    end = time.monotonic() + timeout
    attempt = 0
    while True:
        try:
            return submit(request, timeout=max(0.001, end - time.monotonic()))
        except grpc.RpcError as exc:
            attempt += 1
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
            wait = backoff_s(attempt, first_s=RESEND_FIRST_BACKOFF_S, max_s=RESEND_MAX_BACKOFF_S)
            retry = code is grpc.StatusCode.UNAVAILABLE and not details.startswith(
                QuorumNotMetError.PREFIX
            )
            # Re-sent only with time left for the hub to ask its nodes again.
            if not retry or time.monotonic() + wait + RESEND_MIN_LEFT_S > end:
                raise
            time.sleep(wait)


def with_secure_aggregation(
    query: Query, pooled_only: bool | None = None, honest_nodes: int | None = None
) -> Query:
    """The query with pooled_only / honest_nodes replaced where given (None: keep the query's).

    pooled_only=False also clears the query's honest_nodes, which only goes with it.
    """
    if pooled_only is None and honest_nodes is None:
        return query
    pooled = query.pooled_only if pooled_only is None else pooled_only
    # pooled_only=False also clears honest_nodes, unless given (then Query refuses the pair).
    t = honest_nodes if honest_nodes is not None else (query.honest_nodes if pooled else None)
    return dataclasses.replace(query, pooled_only=pooled, honest_nodes=t)


def _is_pooled_only(envelope: node_pb2.QueryEnvelope) -> bool:
    """Whether an envelope carries a pooled_only query (False for anything unreadable)."""
    try:
        data = json.loads(envelope.query)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and data.get("pooled_only") is True


@dataclass(frozen=True)
class NodeBudget:
    """A node's privacy budget, and what the calling analyst can still spend there."""

    node: str
    status: NodeStatus
    message: str = ""
    budget: BudgetStatus | None = None  # the node's total, spent and remaining
    analyst: BudgetStatus | None = None  # this analyst's spent and remaining (see Accountant)


# A query that every node can plan (its `persons` view), signed for the budget operation and
# used only with Explain, which runs nothing and spends nothing, to ask each node what the
# signing analyst may still spend. No node executes an envelope signed for it.
BUDGET_PROBE = Query(view="persons", rho=1e-6)


class Federation:
    """A connection to the hub as one analyst; every query is signed with the analyst's key.

    server_name is the hub's name in its certificate: TLS accepts only a hub that carries it,
    and every envelope is addressed to it, so no other hub can relay what this client signs.
    """

    def __init__(self, hub: str, identity: Identity | Path, *, server_name: str = "hub") -> None:
        self.hub = hub
        self.hub_name = server_name
        # Where the hub's address came from when connect() found it (named in errors).
        self._hub_from = ""
        self.identity = identity if isinstance(identity, Identity) else load_identity(identity)
        # Explain and ListNodes are retried while the hub is unreachable (protocols/retries.py);
        # query() re-sends Submit's envelope itself, for as long as its deadline allows.
        self._channel = secure_channel(
            hub, self.identity, server_name=server_name, options=HUB_CHANNEL_OPTIONS
        )
        self._stub = hub_pb2_grpc.HubStub(self._channel)

    @classmethod
    def connect(
        cls,
        hub: str | None = None,
        identity: Identity | Path | str | None = None,
        *,
        server_name: str = "hub",
    ) -> Federation:
        """Connect as the CLI does: the hub and identity given, else CHC_HUB and CHC_IDENTITY,
        else those of a running `chc demo --keep-running`.

        Raises ConfigError saying what to pass when none of them has a hub or an identity.
        """
        # Imported here: coordinator.local.demo, which connect reads, imports this module.
        from coordinator.analyst.connect import resolve
        from protocols.cli import read_identity

        if isinstance(identity, Identity):
            # A loaded identity needs no folder: resolve() is asked only where the hub is.
            target = resolve(hub, Path(identity.name))
            loaded = identity
        else:
            target = resolve(hub, identity)
            named_by = {"given": "identity="}.get(target.identity_from, target.identity_from)
            loaded = read_identity(target.identity, flag=named_by)
        fed = cls(target.hub, loaded, server_name=server_name)
        fed._hub_from = "" if target.hub_from == "given" else target.hub_from
        return fed

    def sign(
        self,
        query: Query | ModelSpec,
        *,
        operation: Operation = Operation.EXECUTE,
        nodes: Sequence[str] = (),
        ttl_s: float = 600.0,
    ) -> node_pb2.QueryEnvelope:
        """The envelope this client sends: query signed for operation, addressed to this hub.

        nodes, if given, are the only nodes that will accept it (an analyst may also present
        it to them directly); the hub still relays to every node, and the others refuse it.
        A pooled_only query must name its nodes (secure aggregation needs k, and each node
        checks that the hub left no node of the round out): without nodes, it is addressed to
        every node the hub lists (pooled_nodes).
        """
        if isinstance(query, Query) and query.pooled_only:
            nodes = self.pooled_nodes(query, nodes)
        signed = sign_query(
            self.identity,
            model_bytes(query) if isinstance(query, ModelSpec) else canonical_bytes(query),
            operation=operation,
            audience=Audience(hub=self.hub_name, nodes=tuple(nodes)),
            ttl_ms=int(ttl_s * 1000),
        )
        return serde.signed_query_to_proto(signed)

    def pooled_nodes(
        self, query: Query, nodes: Sequence[str] = (), *, timeout_s: float = 30.0
    ) -> tuple[str, ...]:
        """The nodes a pooled_only query's envelope names, sorted: those given, else every
        node the hub lists as described (Federation.nodes()).

        Raises QueryError, before anything is signed, for fewer than 2 nodes or for
        honest_nodes above their number.
        """
        if isinstance(nodes, str):
            raise QueryError(f"nodes must be a list of node names, not one string ({nodes!r})")
        absent = ""
        if nodes:
            named = sorted(set(nodes))
            where = "nodes= names"
        else:
            found, missing = self.nodes(timeout_s=timeout_s)
            named = sorted({d.node for d in found})
            where = "the hub lists"
            if missing:
                absent = "; not answering: " + ", ".join(
                    f"{o.node} {o.status.value}" for o in missing
                )
        shown = ", ".join(named) if named else "none"
        if len(named) < MIN_SECURE_NODES:
            raise QueryError(
                f"secure aggregation needs at least {MIN_SECURE_NODES} nodes; {where} "
                f"{len(named)} ({shown}{absent}): run the query without pooled_only, or when "
                "more nodes answer"
            )
        t = query.honest_nodes
        if t is not None and t > len(named):
            raise QueryError(
                f"honest_nodes {t} is more than the {len(named)} nodes of the query ({shown}): "
                f"give at most {len(named)}, or leave it out to assume all of them honest"
            )
        return tuple(named)

    def _signed_request(
        self,
        query: Query | ModelSpec,
        operation: Operation,
        *,
        deadline_s: float,
        ttl_s: float = 600.0,
        nodes: Sequence[str] = (),
    ) -> hub_pb2.SubmitRequest:
        return hub_pb2.SubmitRequest(
            envelope=self.sign(query, operation=operation, ttl_s=ttl_s, nodes=nodes),
            deadline_ms=int(deadline_s * 1000),
        )

    def query(
        self,
        query: Query,
        *,
        deadline_s: float = 30.0,
        ttl_s: float = 600.0,
        quorum: int = 0,
        nodes: Sequence[str] = (),
        pooled_only: bool | None = None,
        honest_nodes: int | None = None,
    ) -> FederatedResult:
        """Sign a query, run it at every node, and return per-region and pooled estimates.

        quorum: the fewest nodes that must answer (0: any, with a partial result flagged);
        with fewer the query fails. While the hub is unavailable the same signed envelope is
        re-sent (protocols/retries.py), so nodes that already answered re-send their kept
        release at no further cost.

        pooled_only / honest_nodes, if given, replace the query's own: a pooled_only query
        is a secure aggregate (pooled rows only, central DP's noise; docs/secure-aggregation.md)
        over the nodes given, else every node the hub lists.
        """
        query = with_secure_aggregation(query, pooled_only, honest_nodes)
        if query.pooled_only:
            nodes = self.pooled_nodes(query, nodes, timeout_s=deadline_s)
        envelope = self.sign(query, operation=Operation.EXECUTE, ttl_s=ttl_s, nodes=nodes)
        return self.run(envelope, deadline_s=deadline_s, quorum=quorum)

    def run(
        self, envelope: node_pb2.QueryEnvelope, *, deadline_s: float = 30.0, quorum: int = 0
    ) -> FederatedResult:
        """Run an envelope signed with sign() (operation execute) at every node, as query()
        does: keep the envelope (save_envelope) to read its releases again with resend()."""
        if quorum < 0:
            raise QueryError(f"quorum must be 0 (any number of nodes) or more, got {quorum}")
        named = sorted(set(envelope.audience.nodes))
        if len(named) < MIN_SECURE_NODES and _is_pooled_only(envelope):
            # Nodes refuse it (they need k, and check the round against the audience): say so
            # here rather than have every node refuse.
            raise QueryError(
                f"this envelope's query is pooled_only but names {len(named)} node(s) in its "
                f"audience; secure aggregation needs at least {MIN_SECURE_NODES}: sign it with "
                "Federation.sign, which names every node the hub lists, or give nodes="
            )
        request = hub_pb2.SubmitRequest(
            envelope=envelope, deadline_ms=int(deadline_s * 1000), quorum=quorum
        )
        try:
            # Give the hub a little longer than the nodes, so node timeouts are reported.
            response = _resend_while_unavailable(self._stub.Submit, request, deadline_s + 5.0)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return serde.result_from_proto(response)

    def resend(
        self, envelope: node_pb2.QueryEnvelope, *, deadline_s: float = 30.0
    ) -> FederatedResult:
        """Read again what every node kept for an envelope already run; charges nothing.

        Each node re-sends the release it kept for this very envelope (status ok, resent,
        with its receipt) or says that it kept none, which means it charged nothing for it
        (status refused); nothing is run anywhere. Kept releases last until the envelope
        expires (its ttl_s). Nodes that do not answer are timed_out, charge unknown.
        """
        request = hub_pb2.SubmitRequest(
            envelope=envelope, deadline_ms=int(deadline_s * 1000), kept_only=True
        )
        try:
            response = _resend_while_unavailable(self._stub.Submit, request, deadline_s + 5.0)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return serde.result_from_proto(response)

    def explain(
        self,
        query: Query | ModelSpec,
        *,
        deadline_s: float = 30.0,
        nodes: Sequence[str] = (),
        pooled_only: bool | None = None,
        honest_nodes: int | None = None,
    ) -> Explanation:
        """Each node's plan, cost and expected noise for a query or a model; spends nothing.

        The Explanation is a sequence of NodeExplain, one per node, with to_arrow/to_pandas.
        pooled_only / honest_nodes replace the query's own, as in query(); for a pooled_only
        query each node also gives the pooled noise under secure aggregation.
        """
        if isinstance(query, Query):
            query = with_secure_aggregation(query, pooled_only, honest_nodes)
            if query.pooled_only:
                nodes = self.pooled_nodes(query, nodes, timeout_s=deadline_s)
        elif pooled_only is not None or honest_nodes is not None:
            raise QueryError("pooled_only and honest_nodes apply to queries, not to models")
        # Signed for explain, so that no node would run (or fit) this envelope whoever
        # relayed it.
        request = self._signed_request(query, Operation.EXPLAIN, deadline_s=deadline_s, nodes=nodes)
        return self._explain_request(request, deadline_s)

    def fit(
        self, model: ModelSpec, *, deadline_s: float = 60.0, ttl_s: float | None = None
    ) -> FitResult:
        """Sign a model to fit, fit it across every node, and return its coefficients.

        deadline_s is per step: the hub waits that long for the nodes at each of the fit's
        model.steps round trips. The envelope lives long enough for all of them by default.
        """
        ttl = ttl_s if ttl_s is not None else max(600.0, model.steps * deadline_s + 60.0)
        request = self._signed_request(model, Operation.FIT, deadline_s=deadline_s, ttl_s=ttl)
        try:
            # The whole fit: every step's deadline, and a little for the hub's own work.
            response = self._stub.Fit(request, timeout=model.steps * deadline_s + 5.0)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return FitResult.of(serde_fit.fitted_from_proto(response), model)

    def train(self, model: ModelSpec, *, timeout_s: float = 1800.0) -> TrainedModel:
        """Sign a model (solver "gradient") and have the hub train it over Flower.

        Each round is a fit step charged at every node; the answer carries the coefficients,
        each round's noisy training loss, the DP held-out AUC and what each node charged.
        """
        started = time.monotonic()
        request = self._signed_request(
            model, Operation.FIT, deadline_s=timeout_s, ttl_s=timeout_s + 60.0
        )
        try:
            response = self._stub.Train(request, timeout=timeout_s + 10.0)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return TrainedModel.from_json(response.result_json, time.monotonic() - started)

    def _explain(
        self, query: Query | ModelSpec, operation: Operation, *, deadline_s: float
    ) -> Explanation:
        request = self._signed_request(query, operation, deadline_s=deadline_s)
        return self._explain_request(request, deadline_s)

    def _explain_request(self, request: hub_pb2.SubmitRequest, deadline_s: float) -> Explanation:
        try:
            response = self._stub.Explain(request, timeout=deadline_s + 5.0)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return Explanation(tuple(serde.explain_from_proto(n) for n in response.nodes))

    def _error(self, exc: grpc.RpcError) -> ChcError:
        return _raise_from(exc, self.hub, where=self._hub_from)

    def nodes(self, *, timeout_s: float = 30.0) -> tuple[list[NodeDescription], list[NodeOutcome]]:
        """Every node's public catalog and budget, and the nodes that did not answer."""
        try:
            response = self._stub.ListNodes(hub_pb2.ListNodesRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return (
            [serde.description_from_proto(n) for n in response.nodes],
            [serde.outcome_from_proto(o) for o in response.unavailable],
        )

    def addresses(self, *, timeout_s: float = 30.0) -> dict[str, str]:
        """Every configured node's address, by name (auditors connect to nodes directly)."""
        try:
            response = self._stub.ListNodes(hub_pb2.ListNodesRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return dict(response.addresses)

    def budget(self, *, timeout_s: float = 30.0) -> list[NodeBudget]:
        """Each node's remaining budget, overall and for this analyst (spends nothing).

        The analyst's figure comes from each node's Explain of a signed probe query, so the
        node itself says what this analyst may still spend under its per-analyst cap.
        """
        found, missing = self.nodes(timeout_s=timeout_s)
        probes = self._explain(BUDGET_PROBE, Operation.BUDGET, deadline_s=timeout_s)
        explained = {e.node: e for e in probes}
        out: list[NodeBudget] = []
        for d in found:
            e = explained.get(d.node)
            ok = e is not None and e.status is NodeStatus.OK
            out.append(
                NodeBudget(
                    node=d.node,
                    status=NodeStatus.OK,
                    message="" if ok or e is None else f"{e.status.value}: {e.message}",
                    budget=d.budget,
                    analyst=e.budget if ok and e is not None else None,
                )
            )
        out += [NodeBudget(node=o.node, status=o.status, message=o.message) for o in missing]
        return out

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()

    def __enter__(self) -> Federation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
