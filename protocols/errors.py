"""The one error hierarchy of chc.

Every error a user can cause is a ChcError whose subclass also inherits the matching
built-in (ibis style), so callers can catch either. Each carries the gRPC status code it
maps to at a service boundary, and a message that says what to do about it.
"""

from __future__ import annotations

import grpc


class ChcError(Exception):
    """Root of every error chc raises on purpose."""

    status: grpc.StatusCode = grpc.StatusCode.INTERNAL


class QueryError(ValueError, ChcError):
    """The query is malformed or asks for something the catalog does not allow."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class ConfigError(ValueError, ChcError):
    """A configuration file or command-line option is wrong."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class AuthenticationError(PermissionError, ChcError):
    """The caller or the query's signature could not be authenticated."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(PermissionError, ChcError):
    """The caller is authenticated but its role or the node policy forbids the request."""

    status = grpc.StatusCode.PERMISSION_DENIED


class BudgetExceededError(ChcError):
    """The query would spend more privacy budget than the node allows."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataError(ValueError, ChcError):
    """The node's data is missing or does not match the OMOP CDM."""

    status = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceededError(TimeoutError, ChcError):
    """The caller's deadline passed before the work was done; nothing was charged."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class LedgerIntegrityError(ChcError):
    """The ledger does not verify: it was altered, truncated, or signed by another key."""

    status = grpc.StatusCode.FAILED_PRECONDITION
