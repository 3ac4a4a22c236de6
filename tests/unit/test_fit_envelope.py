"""An envelope signed to fit is refused by every other call with words, never a crash."""

from __future__ import annotations

import pytest

from protocols.security.envelope import (
    ACCEPTED_OPERATIONS,
    Call,
    Operation,
    SignedQuery,
    check_operation,
)
from queries.errors import AuthenticationError


def _signed(operation: Operation) -> SignedQuery:
    return SignedQuery(
        query=b"{}",
        analyst="a",
        nonce=b"n" * 16,
        issued_at_ms=0,
        expires_at_ms=1,
        analyst_certificate=b"",
        signature_algorithm="",
        signature=b"",
        operation=operation,
    )


@pytest.mark.parametrize("operation", list(Operation))
@pytest.mark.parametrize("call", list(Call))
def test_every_operation_is_accepted_or_refused_in_words(operation: Operation, call: Call) -> None:
    if operation in ACCEPTED_OPERATIONS[call]:
        check_operation(_signed(operation), call)
        return
    with pytest.raises(AuthenticationError, match="the analyst signed this envelope"):
        check_operation(_signed(operation), call)
