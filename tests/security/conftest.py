"""The attack federation, and the check that an attack leaves every node's budget alone.

One federation (nodes and hub processes, mutual TLS on loopback) serves every attack test
in this package: starting one takes seconds, and the attacks need not be isolated.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup
from protocols.security.pki import Role, issue
from tests.security._attack_helpers import _spent

# Only the demo analyst and "limited" may query; "limited" may only see copd.
ACCESS = """
[access]
analysts = ["demo-analyst", "limited", "revoked-analyst"]
[access.analyst_views]
limited = ["copd"]
"""


@pytest.fixture(scope="package")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("attacks")
    folders = synth.generate_federation(4_000, root / "data", seed=3)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], extra_toml=ACCESS) for r in synth.REGIONS
    )
    federation = LocalFederation(workdir=root, nodes=setups, deadline_ms=5_000)
    federation.create_pki()
    for name in ("limited", "revoked-analyst", "outsider"):
        issue(federation.pki, role=Role.ANALYST, name=name)
    with federation:
        yield federation


@pytest.fixture
def unchanged_budget(fed: LocalFederation) -> Iterator[None]:
    """Every attack must leave every node's budget exactly where it was."""
    before = _spent(fed)
    yield
    assert _spent(fed) == before
