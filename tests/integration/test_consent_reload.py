"""A real node process re-reads its consent register when it changes, and fails closed.

Only noisy releases cross the wire, so the exact effect of an opt-out is shown in-process
(tests/unit/test_consent_reload.py); here the node process is shown to refuse queries with
FAILED_PRECONDITION while its register is invalid, to serve again once it is fixed, and to
have rebuilt its views with the new decisions (its log counts them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from coordinator.analyst.client import Federation
from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from queries.errors import ChcError
from queries.results import NodeStatus
from queries.spec import Query

pytestmark = pytest.mark.integration

QUERY = Query(view="persons", rho=0.01)


def write_register(path: Path, rows: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("person_id,date\n" + "".join(f"{r},2024-01-01\n" for r in rows))
    tmp.replace(path)  # one step, as custodians should replace a register


def until(check: Callable[[], str | None], what: str, timeout_s: float = 30.0) -> str:
    """Poll check() until it returns a string; fail with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got is not None:
            return got
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def test_a_running_node_follows_its_consent_register(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "nwc"
    synth.generate_region(synth.region_by_slug("nwc"), 1_000, folder, seed=11)
    reg = tmp_path / "optouts.csv"
    write_register(reg, ["1"])
    setup = NodeSetup(name="nwc", omop=folder, consent_registers=(reg,))
    with (
        LocalFederation(workdir=tmp_path, nodes=(setup,), deadline_ms=5_000) as fed,
        Federation(fed.hub_address, fed.analyst_identity) as client,
    ):
        assert [n.status for n in client.query(QUERY).nodes] == [NodeStatus.OK]
        write_register(reg, ["2", "12.6"])

        def refused() -> str | None:
            try:
                client.query(QUERY)
            except ChcError as exc:
                return f"{exc.status_name}: {exc}"
            return None

        message = until(refused, "the node to refuse queries")
        assert message.startswith(grpc.StatusCode.FAILED_PRECONDITION.name)
        assert (
            f"consent register {reg} is invalid: person_id is missing or not a whole number"
            in message
        )

        write_register(reg, ["2", "3"])

        def served() -> str | None:
            try:
                return str([n.status for n in client.query(QUERY).nodes])
            except ChcError:
                return None

        assert until(served, "the node to serve again") == str([NodeStatus.OK])
    log = (tmp_path / "logs" / "nwc.log").read_text()
    assert "REFUSING ALL QUERIES" in log
    assert "line 3 ('12.6')" in log  # the custodian's log has the row; the analyst had not
    assert "consent registers re-read" in log
    assert "2 decisions read" in log  # the fixed register's decisions are the ones applied
