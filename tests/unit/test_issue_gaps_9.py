"""Issue 9, item 1: a release that fails at the node leaks no exact value into the server log.

The review found OpenDP's i32 overflow message (which carries the exact component) in the
node's log. Plans now rule such failures out, and NodeService._release logs only the
exception's type under a reference; nothing tested that last guard. Here the noise step is
made to fail with an exact value in its message, on a real node over real DuckDB views.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.local import synth
from node import engine
from node import service as node_service
from node.budget.accounting import MemoryAccountant
from node.data.catalog import build_catalog
from node.data.store import OmopStore
from node.service import NodeService
from protocols.budget.policy import BudgetPolicy
from protocols.security.pki import Role, create_ca, issue, load_identity
from queries import plan
from queries.errors import ChcError
from queries.pathway import load_pathways
from queries.sql import parse_sql

EXACT_TEXT = "exact component 123456789"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeService]:
    root: Path = tmp_path_factory.mktemp("gaps9")
    synth.generate_region(synth.region_by_slug("nwc"), 500, root / "data", seed=9)
    create_ca(root / "pki")
    node_id = load_identity(issue(root / "pki", role=Role.NODE, name="nwc"))
    pathways = load_pathways(None)
    store = OmopStore(root / "data", pathways)
    try:
        yield NodeService(
            name="nwc",
            store=store,
            catalog=build_catalog(pathways),
            accountant=MemoryAccountant(BudgetPolicy(total_rho=10.0), node="nwc"),
            ca_pem=node_id.ca_pem,
            require_tls=False,
        )
    finally:
        store.close()


def test_a_failing_release_logs_no_exact_value(
    service: NodeService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    compiled = plan.compile_query(
        parse_sql("SELECT sex, SUM(age) FROM persons GROUP BY sex", rho=0.1), service.catalog
    )
    releases = engine.calibrations(compiled)

    def failing(*_: object) -> object:
        raise OverflowError(EXACT_TEXT)

    monkeypatch.setattr(engine, "add_noise", failing)
    with caplog.at_level(logging.DEBUG), pytest.raises(ChcError) as raised:
        service._release(compiled, releases)
    assert "nothing was charged" in str(raised.value)
    assert EXACT_TEXT not in str(raised.value)
    assert raised.value.__cause__ is None  # `from None`: no chained message either
    logged = "\n".join(
        r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in caplog.records
    )
    assert "OverflowError" in logged  # the operator still learns what failed
    assert EXACT_TEXT not in logged
    assert node_service.log.name in {r.name for r in caplog.records}
