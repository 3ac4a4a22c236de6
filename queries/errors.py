"""The one error hierarchy of chc.

Every error a user can cause is a ChcError whose subclass also inherits the matching
built-in (ibis style), so callers can catch either. Each names the gRPC status code it maps
to at a service boundary (`status_name`, so that this ground floor needs no
transport: protocols.rpc.status_of turns it into a grpc.StatusCode), and carries a message
that says what to do about it. Every package may import this module; it imports nothing of
ours.
"""

from __future__ import annotations


class ChcError(Exception):
    """Root of every error chc raises on purpose."""

    status_name: str = "INTERNAL"
    # What the refusal cost: the rho a node charged before it decided to refuse (only a fit
    # refused on its design check's noisy counts, docs/models.md). Reported to the caller.
    rho_charged: float = 0.0


class QueryError(ValueError, ChcError):
    """The query is malformed or asks for something the catalog does not allow."""

    status_name = "INVALID_ARGUMENT"


class ConfigError(ValueError, ChcError):
    """A configuration file or command-line option is wrong."""

    status_name = "FAILED_PRECONDITION"


class AuthenticationError(PermissionError, ChcError):
    """The caller or the query's signature could not be authenticated."""

    status_name = "UNAUTHENTICATED"


class PermissionDeniedError(PermissionError, ChcError):
    """The caller is authenticated but its role or the node policy forbids the request."""

    status_name = "PERMISSION_DENIED"


class BudgetExceededError(ChcError):
    """The query would spend more privacy budget than the node allows."""

    status_name = "RESOURCE_EXHAUSTED"


class DataError(ValueError, ChcError):
    """The node's data is missing or does not match the OMOP CDM."""

    status_name = "FAILED_PRECONDITION"


class DeadlineExceededError(TimeoutError, ChcError):
    """The caller's deadline passed before the work was done; nothing was charged."""

    status_name = "DEADLINE_EXCEEDED"


class LedgerIntegrityError(ChcError):
    """The ledger does not verify: it was altered, truncated, or signed by another key."""

    status_name = "FAILED_PRECONDITION"


class QuorumNotMetError(ConnectionError, ChcError):
    """Fewer nodes answered than the query's quorum, so no result was combined."""

    status_name = "UNAVAILABLE"
    # How the hub's message begins, so that a client tells it from an unreachable hub.
    PREFIX = "quorum not met: "
