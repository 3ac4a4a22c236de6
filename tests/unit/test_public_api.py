"""`chc` is the one documented import path: every name it lists is the real one, not a copy."""

from __future__ import annotations

import subprocess
import sys

import chc
from coordinator.analyst.client import Federation
from queries import errors, spec


def test_every_listed_name_is_importable_from_chc() -> None:
    missing = [name for name in chc.__all__ if not hasattr(chc, name)]
    assert missing == []
    assert len(set(chc.__all__)) == len(chc.__all__)


def test_the_names_are_the_classes_the_packages_use() -> None:
    assert chc.Federation is Federation
    assert chc.Query is spec.Query
    # Catching chc.QueryError catches what the planner raises, and it is still a ValueError.
    assert chc.QueryError is errors.QueryError
    assert issubclass(chc.QueryError, ValueError)
    assert issubclass(chc.QueryError, chc.ChcError)


def test_every_error_of_the_tree_is_offered() -> None:
    tree = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.ChcError)
    }
    assert tree <= set(chc.__all__), tree - set(chc.__all__)


def test_the_ground_floor_needs_no_transport() -> None:
    # queries.errors names gRPC statuses as strings: importing it (and the query language)
    # must not load grpc, so the words everyone shares carry no transport with them.
    code = "import sys, queries.errors, queries.spec, queries.plan; print('grpc' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"


def test_every_error_names_a_real_grpc_status() -> None:
    import grpc

    from protocols.rpc import status_of

    expected = {
        errors.QueryError: grpc.StatusCode.INVALID_ARGUMENT,
        errors.ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
        errors.AuthenticationError: grpc.StatusCode.UNAUTHENTICATED,
        errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
        errors.BudgetExceededError: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.DataError: grpc.StatusCode.FAILED_PRECONDITION,
        errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
        errors.LedgerIntegrityError: grpc.StatusCode.FAILED_PRECONDITION,
        errors.ChcError: grpc.StatusCode.INTERNAL,
    }
    for error, status in expected.items():
        assert status_of(error("x")) is status, error
