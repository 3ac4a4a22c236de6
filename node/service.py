"""The node's gRPC servicer: the enforcer of policy, noise and budget (README, "Architecture").

Order of work for a query: authenticate the caller (mTLS) and the analyst (signature), claim
the nonce (or, for an envelope already answered, re-send the release kept for it), parse and
plan against the catalog, check the budget, compute the exact aggregate and the noise, record
the charge durably with a copy of the release, and only then release. Anything refused is
recorded at zero cost and answered with a precise status and message; an attempt that ends
without a charge frees its nonce, so the same envelope can be retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pyarrow as pa
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import x25519

from node import engine
from node.access import AccessPolicy
from node.budget.accounting import Accountant, Charge, Keep, Kept, RateLimited, Refusal
from node.config import REFUSAL_WINDOW_SECONDS, REFUSALS_PER_WINDOW, ModelPolicy
from node.data.care_sites import refuse_undeclared
from node.data.catalog import describe_cohort, with_cohort
from node.data.store import OmopStore
from node.data.view_set import cohort_runner
from node.fitting import Fitter
from node.guards import (
    MAX_RESEND_WAIT_S,
    NonceStore,
    NothingKeptError,
    RefusalLimiter,
    begin_or_kept,
    check_deadline,
    kept_reply,
)
from node.secure_share import (
    RoundKeys,
    SharePlan,
    layout_table,
    plan_shares,
    round_nodes,
    shared_values,
)
from protocols import serde
from protocols.budget.rules import per_query_refusal
from protocols.revocation import RevocationList
from protocols.rpc import guarded
from protocols.secagg import keys as round_keys
from protocols.secagg import masks
from protocols.security.envelope import (
    Call,
    Operation,
    SignedQuery,
    VerifiedAnalyst,
    check_audience,
    check_operation,
    verify_analyst,
)
from protocols.security.pki import Identity, Role
from protocols.security.tls import Peer, peer_of
from protocols.v1 import node_pb2, node_pb2_grpc
from queries import mechanisms, plan, spec, spec_io
from queries.errors import (
    AuthenticationError,
    ChcError,
    ConfigError,
    DeadlineExceededError,
    PermissionDeniedError,
)
from queries.model_io import is_model
from queries.results import NodeDescription, ReleaseRules
from queries.schema import Catalog

log = logging.getLogger(__name__)


# Who may ask a node to run a query: the hub relays analysts' signed envelopes, and an
# analyst may also call a node directly. Auditors read the ledger; nodes never query.
QUERY_ROLES = frozenset({Role.HUB, Role.ANALYST})
LEDGER_ROLES = frozenset({Role.AUDITOR})


@dataclass
class _Attempt:
    """One Execute call's part in answering its envelope (see NonceStore.begin)."""

    digest: bytes  # SHA-256 of the serialised envelope: the key of its kept release
    owner: bool = False  # this call runs the query (and must finish the attempt)
    charged: bool = False  # the charge is durable: the nonce stays claimed


class NodeService(node_pb2_grpc.NodeServicer):
    """Answers Describe, Explain, Execute, FitStep and StreamLedger for one region's data."""

    def __init__(
        self,
        *,
        name: str,
        store: OmopStore,
        catalog: Catalog,
        accountant: Accountant,
        ca_pem: bytes,
        require_tls: bool = True,
        rules: ReleaseRules | None = None,
        access: AccessPolicy | None = None,
        revocations: RevocationList | None = None,
        refusals_per_window: int = REFUSALS_PER_WINDOW,
        refusal_window_s: float = REFUSAL_WINDOW_SECONDS,
        models: ModelPolicy | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.name = name
        # Signs this node's secure-aggregation round keys (None: it takes part in none).
        self.identity = identity
        self.round_keys = RoundKeys()
        self.party = f"node {name}"  # how version refusals name this side (protocols/rpc)
        self.store = store
        self.catalog = catalog
        self.accountant = accountant
        self.ca_pem = ca_pem
        self.require_tls = require_tls
        self.rules = rules or ReleaseRules()
        self.access = access or AccessPolicy()
        self.revocations = revocations
        # Plans assume the views hold at most their declared persons; make sure they do.
        engine.check_row_bounds(catalog, store)
        self.nonces = NonceStore()
        # Bounded work: whoever is refused again and again stops being recorded for a while.
        self.refusals = RefusalLimiter(refusals_per_window, refusal_window_s)
        # The calling peer's name, per worker thread, for _record_refusal (set by _peer).
        self._caller = threading.local()
        seeded = self.nonces.seed(accountant.entries())
        if seeded:
            log.info("remembered %d unexpired nonce(s) from the ledger", seeded)
        # Model fits (node/fitting.py): the same nonces, budget and access policy.
        self.fitter = Fitter(
            name=name,
            store=store,
            catalog=catalog,
            accountant=accountant,
            nonces=self.nonces,
            policy=models or ModelPolicy(),
            access=self.access,
            rules=self.rules,
        )

    def _is_revoked(self, cert: x509.Certificate) -> bool:
        return self.revocations is not None and self.revocations.is_revoked(cert)

    def _peer(self, context: grpc.ServicerContext) -> Peer | None:
        self._caller.peer = None
        if not self.require_tls:
            return None
        peer = peer_of(context, is_revoked=self._is_revoked)
        self._caller.peer = peer.name
        return peer

    def _authorise(
        self,
        envelope: node_pb2.QueryEnvelope,
        context: grpc.ServicerContext,
        call: Call = Call.EXECUTE,
    ) -> tuple[SignedQuery, VerifiedAnalyst]:
        """Who may present this envelope for this call (the default is the strictest, Execute)."""
        peer = self._peer(context)
        # The node's own Flower relay (node/flower/relay.py) presents fit steps with the node's
        # own certificate: the node trusts its own key, and the analyst's signature is checked
        # below all the same. No other node may.
        own_relay = peer is not None and peer.role is Role.NODE and peer.name == self.name
        if own_relay and call is not Call.FIT:
            raise PermissionDeniedError(
                f"{self.name} (this node) may relay only model fit steps, not {call.value}"
            )
        if peer is not None and peer.role not in QUERY_ROLES and not own_relay:
            raise PermissionDeniedError(
                f"{peer.name} has role {peer.role.value}; only analysts (directly or through "
                "the hub) may run queries"
            )
        signed = serde.signed_query_from_proto(envelope)
        analyst = verify_analyst(signed, self.ca_pem, is_revoked=self._is_revoked)
        if peer is not None and peer.role is Role.ANALYST and peer.name != analyst.name:
            raise AuthenticationError("an analyst may only submit envelopes it signed itself")
        # A genuine signature authorises only what it says: an envelope signed to explain or
        # to probe the budget is never executed, whoever relays it.
        check_operation(signed, call)
        # A relaying hub must be the one the analyst named (its certificate name). An analyst
        # calling the node presents its own envelope (checked above), whatever hub it names;
        # without TLS (dev only) no caller is known, so only the nodes are checked.
        relay = peer.name if peer is not None and peer.role is Role.HUB else None
        check_audience(signed, node=self.name, hub=relay)
        return signed, analyst

    def _price(
        self, signed: SignedQuery, analyst: VerifiedAnalyst
    ) -> tuple[spec.Query, plan.Plan, tuple[engine.ComponentRelease, ...], float]:
        """Parse, authorise against the access policy, plan and calibrate; touches no data."""
        query = spec_io.from_json(signed.query)
        self.access.check(analyst=analyst.name, organisation=analyst.organisation, view=query.view)
        # The per-query cap is public: refuse above it before planning and calibrating, so that
        # an absurd rho is a clear refusal, never a calibration failure.
        refused = per_query_refusal(self.accountant.policy, query.rho)
        if refused is not None:
            raise refused
        catalog = self.catalog
        if query.cohort is not None:
            # The custodian's governance of ad hoc cohorts: refused here, before any charge.
            self.store.settings.cohorts.check(query.cohort)
            catalog = with_cohort(catalog, query.cohort, mortality=self.store.mortality)
        # Named, not "no such column": the custodian chooses whether care sites are public.
        refuse_undeclared(query, self.store.settings.care_sites)
        compiled = plan.compile_query(query, catalog)
        releases = engine.calibrations(compiled)
        return query, compiled, releases, sum(r.calibration.rho for r in releases)

    @guarded
    def Describe(  # noqa: N802 - gRPC method name
        self, request: node_pb2.DescribeRequest, context: grpc.ServicerContext
    ) -> node_pb2.DescribeResponse:
        """The public catalog and budget."""
        del request  # carries no fields
        self._peer(context)
        msg = serde.description_to_proto(
            NodeDescription(
                node=self.name,
                protocol_version=serde.PROTOCOL_VERSION,
                catalog=self.catalog,
                budget=self.accountant.status(),
                cohorts=self.store.settings.cohorts,
            )
        )
        msg.ledger_public_key = self.accountant.public_key
        return msg

    @guarded
    def Explain(  # noqa: N802 - gRPC method name
        self, request: node_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> node_pb2.ExplainResponse:
        """Plan and price a signed query; touches no data and spends nothing."""
        # Spending nothing, Explain claims no nonce: the envelopes it takes (explain, budget,
        # and execute ones, which it only prices) may be explained again until they expire.
        signed, analyst = self._authorise(request.envelope, context, Call.EXPLAIN)
        # A model is explained from an envelope signed to explain it (which no FitStep takes),
        # or from the fit envelope itself, which Explain only prices.
        if is_model(signed.query):
            return self.fitter.explain(signed, analyst, request.regions)
        if signed.operation is Operation.FIT:
            raise AuthenticationError(
                "the envelope is signed to fit a model but holds a query; sign a query to "
                "execute or explain it"
            )
        query, compiled, releases, rho = self._price(signed, analyst)
        if request.structure:
            self._check_structure(query, request.structure)  # as Execute would
        text = compiled.describe()
        if query.cohort is not None:
            ancestor = self.store.concept_ancestor
            text += "\n" + describe_cohort(query.cohort, concept_ancestor=ancestor)
        status = self.accountant.status(analyst.name)
        msg = node_pb2.ExplainResponse(
            plan=text,
            measures=[serde.measure_noise_to_proto(r.measure_noise()) for r in releases],
            rho=rho,
            epsilon=mechanisms.rho_to_epsilon(rho, status.delta),
            cells=compiled.cells,
            budget=serde.budget_to_proto(status),
        )
        if query.pooled_only:
            # Both noises, so that the analyst can choose (nothing is announced or charged).
            nodes, threshold = round_nodes(signed, query, self.name)
            shares = plan_shares(compiled, nodes, threshold)
            msg.secure_measures.extend(serde.measure_noise_to_proto(m) for m in shares.measures())
            msg.secure_aggregation.CopyFrom(serde.guarantee_to_proto(shares.guarantee))
        return msg

    @guarded
    def Execute(  # noqa: N802 - gRPC method name
        self, request: node_pb2.ExecuteRequest, context: grpc.ServicerContext
    ) -> node_pb2.ExecuteResponse:
        """Verify, plan, charge, then release one query (refusals cost nothing).

        Idempotent: the same envelope again (a retry after a lost reply) is answered with the
        release kept for it, marked `resent`, and charged nothing more. With `kept_only` it
        is only that: the kept release, or NOT_FOUND, never a computation or a charge.
        """
        signed, analyst = self._authorise_recorded(request.envelope, context)
        envelope_bytes = request.envelope.SerializeToString(deterministic=True)
        attempt = _Attempt(digest=hashlib.sha256(envelope_bytes).digest())
        if request.kept_only:
            # A read, like Explain: its outcome is not a refusal of a query (none was run).
            return self._kept_only(signed, attempt.digest, context)
        try:
            if not is_model(signed.query) and spec_io.from_json(signed.query).pooled_only:
                # The analyst gave up this node's own figures: only a masked share may leave.
                raise PermissionDeniedError(
                    "the query is pooled_only: this node releases only its masked share of a "
                    "secure aggregate (SecAggShare), never its own figures; nothing was charged"
                )
            kept = self._begin(signed, attempt, context)
            if kept is not None:
                return kept
            return self._execute(
                signed, analyst, envelope_bytes, attempt, context, structure=request.structure
            )
        except ChcError as exc:
            self._record_refusal(request.envelope, analyst.name, exc)
            raise
        finally:
            if attempt.owner:
                self.nonces.finish(signed.nonce, signed.expires_at_ms, charged=attempt.charged)

    def _begin(
        self, signed: SignedQuery, attempt: _Attempt, context: grpc.ServicerContext
    ) -> node_pb2.ExecuteResponse | None:
        """Own this envelope's attempt (None), or return the release kept for it."""
        kept = begin_or_kept(
            self.nonces,
            signed.nonce,
            attempt.digest,
            context,
            self.accountant.stored_release,
            replayed="this query envelope was already used; sign it again",
        )
        if kept is None:
            attempt.owner = True
            return None
        return self._resent(kept)

    def _resent(self, kept: Kept) -> node_pb2.ExecuteResponse:
        """The release kept for an envelope, marked resent, with today's budget."""
        msg = kept_reply(kept, node_pb2.ExecuteResponse, self.accountant.status())
        log.info(
            "query %s: re-sent the kept release of ledger entry %d (nothing charged)",
            msg.query_id,
            kept.sequence,
        )
        return msg

    def _kept_only(
        self, signed: SignedQuery, digest: bytes, context: grpc.ServicerContext
    ) -> node_pb2.ExecuteResponse:
        """The release kept for this envelope, after any call still answering it; else
        NOT_FOUND. Never computes, charges or claims the nonce (so the envelope may still
        be executed, if no call ever charged it)."""
        pending, claimed = self.nonces.watch(signed.nonce, digest)
        if pending is not None:
            remaining = context.time_remaining()
            wait = MAX_RESEND_WAIT_S if remaining is None else min(remaining, MAX_RESEND_WAIT_S)
            if not pending.wait(timeout=max(0.0, wait)):
                raise DeadlineExceededError(
                    "a call with this envelope is still being answered; whether it charges is "
                    "not known yet: re-send it later to read its release (nothing is charged "
                    "for reading it)"
                )
            claimed = self.nonces.watch(signed.nonce, digest)[1]
        kept = self.accountant.stored_release(digest)
        if kept is not None:
            return self._resent(kept)
        if claimed:
            # Charged under this nonce, but this exact envelope's copy is not here (another
            # envelope with the same nonce): the ledger is the record.
            raise NothingKeptError(
                "no release is kept for this envelope, but its nonce was charged for another "
                "envelope: `chc budget` and the ledger show that charge"
            )
        raise NothingKeptError("no release is kept for this envelope: nothing was charged")

    def _execute(
        self,
        signed: SignedQuery,
        verified: VerifiedAnalyst,
        envelope: bytes,
        attempt: _Attempt,
        context: grpc.ServicerContext,
        *,
        structure: bytes = b"",
    ) -> node_pb2.ExecuteResponse:
        analyst = verified.name
        query, compiled, releases, rho = self._price(signed, verified)
        if structure:
            self._check_structure(query, structure)
        self.accountant.check(analyst, rho)
        query_id = uuid.uuid4().hex
        started = time.perf_counter()
        check_deadline(context, "before computing")
        table = self._release(compiled, releases)
        epsilon = mechanisms.rho_to_epsilon(rho, self.accountant.policy.delta)
        # Built before the charge, so that the kept copy is stored in the charge's own
        # transaction; the budget and ledger sequence are filled in after it.
        msg = serde.release_to_proto(
            engine.node_release(
                releases,
                table,
                query_id=query_id,
                epsilon=epsilon,
                budget=self.accountant.status(),
                rules=self.rules,
            )
        )
        keep = Keep(
            envelope_sha256=attempt.digest,
            expires_at_ms=signed.expires_at_ms,
            response=msg.SerializeToString(),
        )
        # The caller has given up: charging now would spend budget on an answer nobody
        # receives. Checked last before the charge (the charge itself takes about a ms).
        check_deadline(context, "before charging")
        # Charge before release (principle 2): the noisy table is ready but leaves only once
        # the charge is durable; from here a failure loses the reply, never the charge, and a
        # retry of the envelope reads the kept release.
        budget, sequence = self.accountant.charge(
            Charge(
                query_id=query_id,
                analyst=analyst,
                query=signed.query,
                envelope=envelope,
                views=(query.view,),
                rho=rho,
                epsilon=epsilon,
            ),
            keep,
        )
        attempt.charged = True
        log.info(
            "query %s from %s: view=%s cells=%d rho=%.6g in %.1f ms (ledger #%d)",
            query_id,
            analyst,
            query.view,
            compiled.cells,
            rho,
            (time.perf_counter() - started) * 1000,
            sequence,
            extra={"query_id": query_id, "analyst": analyst},
        )
        msg.budget.CopyFrom(serde.budget_to_proto(budget))
        msg.ledger_sequence = sequence
        return msg

    def _check_structure(self, query: spec.Query, expected: bytes) -> None:
        """Refuse at no cost a query whose columns here differ from what the hub found at
        the other nodes (ExecuteRequest.structure): its figures could not be pooled."""
        if query.cohort is not None:
            return  # an ad hoc cohort's view is built here; the hub compares base views
        ours = serde.pooling_structure(self.catalog.view(query.view), query)
        if serde.structure_fingerprint(ours) != expected:
            raise ConfigError(
                f"{self.name}: the public structure (domains, bounds) of the columns this "
                f"query reads in view {query.view!r} differs from what the hub found at the "
                "other nodes, so this node's figures could not be pooled with theirs; nothing "
                "was charged: compare `chc nodes` and align the nodes' catalogs"
            )

    def _release(
        self, compiled: plan.Plan, releases: tuple[engine.ComponentRelease, ...]
    ) -> pa.Table:
        """Exact aggregate, noise and the node's disclosure rules, before any charge.

        Planning has ruled out every data-dependent failure (overflow, cells, grids); should
        something still fail here, nothing is charged and nothing about the data is logged:
        an exception's message could carry an exact value, so only its type is recorded.
        """
        with _before_the_charge("the release"):
            # An ad hoc cohort is built here (or found in the views' cache), before the charge.
            with self.store.snapshot() as views, cohort_runner(views, compiled.query) as runner:
                exact = engine.exact_values(compiled, runner)
            noisy = engine.add_noise(releases, exact)
            del exact  # nothing exact outlives this function
            shown = engine.withhold_small_cells(compiled, releases, noisy, self.rules)
            return engine.release_table(compiled, releases, shown)

    def _share_plan(
        self, signed: SignedQuery, verified: VerifiedAnalyst, structure: bytes
    ) -> tuple[spec.Query, SharePlan, Identity]:
        """Price a pooled_only query for its round, from public facts; touches no data."""
        identity = self.identity
        if identity is None:
            raise ConfigError(
                f"{self.name} takes part in no secure aggregation: it was started without "
                "its identity key to sign round keys"
            )
        query, compiled, _, _ = self._price(signed, verified)
        nodes, threshold = round_nodes(signed, query, self.name)
        if structure:
            self._check_structure(query, structure)
        share_plan = plan_shares(compiled, nodes, threshold)
        self.accountant.check(verified.name, share_plan.rho)
        return query, share_plan, identity

    def _authorise_recorded(
        self, envelope: node_pb2.QueryEnvelope, context: grpc.ServicerContext
    ) -> tuple[SignedQuery, VerifiedAnalyst]:
        """_authorise for an execute envelope, recording a refusal under the analyst it
        claims (who could not be verified)."""
        try:
            return self._authorise(envelope, context)
        except ChcError as exc:
            self._record_refusal(envelope, envelope.analyst, exc)
            raise

    @guarded
    def SecAggAnnounce(  # noqa: N802 - gRPC method name
        self, request: node_pb2.SecAggRequest, context: grpc.ServicerContext
    ) -> node_pb2.SecAggAnnouncement:
        """Round 1: plan and price the query, then sign a fresh round key; spends nothing."""
        signed, analyst = self._authorise_recorded(request.envelope, context)
        try:
            identity = self._share_plan(signed, analyst, request.structure)[2]
            if self.nonces.watch(signed.nonce, b"")[1]:
                raise AuthenticationError("this query envelope was already used; sign it again")
            digest = _digest(request.envelope)
            key = self.round_keys.new(digest, signed.expires_at_ms, _now_ms())
            ann = round_keys.announce(identity, key, digest)
        except ChcError as exc:
            self._record_refusal(request.envelope, analyst.name, exc)
            raise
        return serde.announcement_to_proto(ann)

    @guarded
    def SecAggShare(  # noqa: N802 - gRPC method name
        self, request: node_pb2.SecAggRequest, context: grpc.ServicerContext
    ) -> node_pb2.SecAggShareResponse:
        """Round 2: check the round, charge, then the exact values plus noise share, masked."""
        signed, analyst = self._authorise_recorded(request.envelope, context)
        envelope_bytes = request.envelope.SerializeToString(deterministic=True)
        digest = round_keys.query_digest(envelope_bytes)
        attempt = _Attempt(digest=digest)
        try:
            key = self.round_keys.peek(digest, _now_ms())
            query, share_plan, _ = self._share_plan(signed, analyst, request.structure)
            verified = [
                round_keys.verify_announcement(
                    serde.announcement_from_proto(a),
                    self.ca_pem,
                    digest,
                    is_revoked=self._is_revoked,
                )
                for a in request.announcements
            ]
            # The round must be exactly the envelope's nodes, with this node's own key: the
            # hub can neither leave an honest node out nor substitute a key.
            masks.round_names(
                self.name,
                verified,
                round_keys.public_bytes(key.public_key()),
                digest,
                share_plan.guarantee.round,
            )
            begun = self.nonces.begin(signed.nonce, digest)
            if not begun.owner:
                raise AuthenticationError("this query envelope was already used; sign it again")
            attempt.owner = True
            return self._share(
                signed, analyst, envelope_bytes, digest, query, share_plan, verified, key, context
            )
        except ChcError as exc:
            self._record_refusal(request.envelope, analyst.name, exc)
            raise
        finally:
            if attempt.owner:
                self.nonces.finish(signed.nonce, signed.expires_at_ms, charged=attempt.charged)
                self.round_keys.forget(digest)

    def _share(
        self,
        signed: SignedQuery,
        verified: VerifiedAnalyst,
        envelope: bytes,
        digest: bytes,
        query: spec.Query,
        share_plan: SharePlan,
        announcements: list[round_keys.VerifiedAnnouncement],
        key: x25519.X25519PrivateKey,
        context: grpc.ServicerContext,
    ) -> node_pb2.SecAggShareResponse:
        query_id = uuid.uuid4().hex
        started = time.perf_counter()
        check_deadline(context, "before computing")
        with _before_the_charge("the masked share"):
            with self.store.snapshot() as views, cohort_runner(views, query) as runner:
                exact = engine.exact_values(share_plan.compiled, runner)
            vector = masks.masked(
                shared_values(share_plan, exact),
                self.name,
                announcements,
                key,
                digest,
                expected_nodes=share_plan.guarantee.round,
            )
            del exact  # nothing exact outlives this function
        rho = share_plan.rho
        epsilon = mechanisms.rho_to_epsilon(rho, self.accountant.policy.delta)
        msg = node_pb2.SecAggShareResponse(
            query_id=query_id,
            masked=vector.astype("<u8").tobytes(),
            layout=layout_table(share_plan),
            measures=[serde.measure_noise_to_proto(m) for m in share_plan.measures()],
            rho_charged=rho,
            epsilon=epsilon,
            release_rules=serde.rules_to_proto(self.rules),
            guarantee=serde.guarantee_to_proto(share_plan.guarantee),
        )
        check_deadline(context, "before charging")
        # Charge before release (principle 2), with what the share guarantees.
        budget, sequence = self.accountant.charge(
            Charge(
                query_id=query_id,
                analyst=verified.name,
                query=signed.query,
                envelope=envelope,
                views=(query.view,),
                rho=rho,
                epsilon=epsilon,
                secure_aggregation=share_plan.guarantee,
            )
        )
        log.info(
            "query %s from %s: masked share of a secure aggregate over %d nodes, view=%s "
            "rho=%.6g in %.1f ms (ledger #%d)",
            query_id,
            verified.name,
            share_plan.guarantee.nodes,
            query.view,
            rho,
            (time.perf_counter() - started) * 1000,
            sequence,
            extra={"query_id": query_id, "analyst": verified.name},
        )
        msg.budget.CopyFrom(serde.budget_to_proto(budget))
        msg.ledger_sequence = sequence
        return msg

    def _record_refusal(
        self, envelope: node_pb2.QueryEnvelope, analyst: str, exc: ChcError
    ) -> None:
        """Record a refusal (a bounded digest), unless its peer is being rate-limited.

        The peer is the caller's certificate name (set by _peer in this call) or, without
        TLS, the analyst the envelope claims. A rate-limited refusal keeps its status code;
        its message (exc, re-raised by the caller) says that the node is rate-limiting.
        """
        peer = getattr(self._caller, "peer", None) or envelope.analyst[:128]
        self._caller.peer = None
        admission = self.refusals.admit(peer)
        limited: RateLimited | None = None
        if admission.starts or not admission.record:
            until = datetime.now(UTC) + timedelta(seconds=admission.remaining_s)
            when = until.isoformat(timespec="seconds").replace("+00:00", "Z")
            if admission.starts:
                limited = RateLimited(
                    peer=peer,
                    refusals=self.refusals.limit,
                    window_seconds=self.refusals.window_s,
                    until=until,
                )
                note = (
                    f"this node is now rate-limiting refusals from {peer} ({self.refusals.limit}"
                    f" in {self.refusals.window_s:g} s): until {when} further refusals are "
                    "answered but not recorded in its ledger"
                )
                log.warning("rate-limiting refusals from %s until %s", peer, when)
            else:
                note = (
                    f"this node is rate-limiting refusals from {peer} until {when}: this "
                    "refusal is not recorded in its ledger"
                )
            # The caller re-raises exc itself: same type and status, with the note added.
            exc.args = (f"{exc} ({note})",)
        if not admission.record:
            return
        try:
            self.accountant.refuse(
                Refusal(
                    analyst=analyst,
                    query=envelope.query,
                    envelope=envelope.SerializeToString(deterministic=True),
                    reason=str(exc),
                    code=exc.status_name,
                    rate_limited=limited,
                )
            )
        except Exception:
            # The refusal itself must still reach the client; the operator sees this.
            log.exception("could not record a refusal in the ledger")

    @guarded
    def FitStep(  # noqa: N802 - gRPC method name
        self, request: node_pb2.FitStepRequest, context: grpc.ServicerContext
    ) -> node_pb2.FitStepResponse:
        """One charged step of a model fit (node/fitting.py); refusals cost nothing."""
        try:
            signed, analyst = self._authorise(request.envelope, context, Call.FIT)
        except ChcError as exc:
            self._record_refusal(request.envelope, request.envelope.analyst, exc)
            raise
        try:
            return self.fitter.step(signed, analyst, request, context)
        except ChcError as exc:
            self._record_refusal(request.envelope, analyst.name, exc)
            raise

    @guarded
    def StreamLedger(  # noqa: N802 - gRPC method name
        self, request: node_pb2.LedgerRequest, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.LedgerEntry]:
        """Every ledger entry from a sequence number on, then the signed head; auditors only.

        Read lazily from one snapshot of the ledger, so a long ledger is never held in memory
        and appends made meanwhile neither block nor tear the stream.
        """
        peer = self._peer(context)
        if peer is not None and peer.role not in LEDGER_ROLES:
            raise PermissionDeniedError(
                f"{peer.name} has role {peer.role.value}; only auditors may read the ledger"
            )
        return (
            node_pb2.LedgerEntry(
                sequence=e.sequence, body=e.body, signature=e.signature, head=e.head
            )
            for e in self.accountant.stream(max(1, request.from_sequence))
        )


def _digest(envelope: node_pb2.QueryEnvelope) -> bytes:
    """The query digest every round message is bound to: the envelope's SHA-256."""
    return round_keys.query_digest(envelope.SerializeToString(deterministic=True))


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextlib.contextmanager
def _before_the_charge(what: str) -> Iterator[None]:
    """Computing what is about to be released, before any charge.

    Planning has ruled out every data-dependent failure; should something still fail,
    nothing is charged and nothing about the data is logged: an exception's message could
    carry an exact value, so only its type is recorded.
    """
    try:
        yield
    except ChcError:
        raise
    except Exception as exc:
        ref = uuid.uuid4().hex[:12]
        log.error("%s failed (ref %s): %s; nothing was charged", what, ref, type(exc).__name__)
        raise ChcError(
            f"internal error computing {what} (ref {ref}); nothing was charged"
        ) from None
