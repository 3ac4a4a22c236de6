"""The hub's side of secure aggregation: only the full sum is ever decoded, and a round with
a missing vector is refused saying what each node charged."""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest

from coordinator.hub.fanout import Reply
from coordinator.hub.secure_round import SecureRoundAbortedError, _abort_round_two, _outcome
from protocols.v1 import node_pb2
from queries.results import NodeStatus

COORDINATOR = Path(__file__).resolve().parents[2] / "coordinator"
# What the hub may use of the secure-aggregation library: the sum of every vector.
ALLOWED = {"unmask_sum"}
FORBIDDEN_MODULES = {"protocols.secagg.ring", "queries.distributed_noise"}


def _secagg_names(tree: ast.AST) -> set[str]:
    """Names the module takes from protocols.secagg.masks, and what it calls on `masks`."""
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "protocols.secagg.masks":
            used.update(a.name for a in node.names)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "masks"
        ):
            used.add(node.attr)
    return used


def test_the_hub_has_no_path_to_a_single_unmasked_vector() -> None:
    """No coordinator module decodes ring elements, draws masks or noise: the hub's only
    use of the library is unmask_sum over the round's vectors."""
    seen: set[str] = set()
    for path in COORDINATOR.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in FORBIDDEN_MODULES, f"{path} imports {node.module}"
                if node.module == "protocols.secagg":
                    assert {a.name for a in node.names} <= {"masks"}, path
            if isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & FORBIDDEN_MODULES, path
        names = _secagg_names(tree)
        assert names <= ALLOWED, f"{path} uses {sorted(names - ALLOWED)} of the secagg masks"
        seen |= names
    assert seen == ALLOWED  # the check above looked at the module that sums


def _share(node: str, sequence: int) -> Reply[object]:
    return Reply(
        node=node,
        status=NodeStatus.OK,
        value=node_pb2.SecAggShareResponse(
            query_id=f"q-{node}", rho_charged=0.02, ledger_sequence=sequence
        ),
        message="",
        code=grpc.StatusCode.OK,
        latency_ms=1.0,
    )


def test_a_missing_vector_aborts_and_names_every_charge() -> None:
    lost = Reply(
        node="nenc",
        status=NodeStatus.UNREACHABLE,
        value=None,
        message="node nenc is unreachable",
        code=grpc.StatusCode.UNAVAILABLE,
        latency_ms=1.0,
    )
    replies = [_share("gm", 7), lost, _share("wy", 3)]
    with pytest.raises(SecureRoundAbortedError) as info:
        _abort_round_two(replies, [lost], [_outcome(r) for r in replies])
    text = str(info.value)
    assert "round 2" in text
    assert "1 of 3 nodes did not send" in text
    assert "nenc unreachable" in text
    assert "gm rho 0.02 (ledger #7)" in text
    assert "wy rho 0.02 (ledger #3)" in text
    assert "nothing was released" in text
    assert info.value.status_name == "ABORTED"
