"""A real federation on loopback: synthetic regions, PKI, node and hub processes, mTLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.local import synth
from coordinator.local.federation import LocalFederation, NodeSetup

PERSONS = 20_000


def _federation(root: Path, **node_options: float) -> LocalFederation:
    folders = synth.generate_federation(PERSONS, root / "data", seed=7)
    setups = tuple(
        NodeSetup(name=r.slug, omop=folders[r.slug], title=r.name, **node_options)
        for r in synth.REGIONS
    )
    return LocalFederation(workdir=root, nodes=setups, deadline_ms=5_000)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """One federation shared by a test module (start-up takes a couple of seconds)."""
    with _federation(tmp_path_factory.mktemp("fed")) as fed:
        yield fed


@pytest.fixture
def fresh_federation(tmp_path: Path) -> Iterator[LocalFederation]:
    """A federation of its own, for tests that stop nodes or spend the budget."""
    with _federation(tmp_path, total_rho=1.0, max_rho_per_query=0.5) as fed:
        yield fed
