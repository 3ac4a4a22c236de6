"""The example configurations in deploy/ load with the real loaders and agree with each other.

They are what a custodian and a hub operator copy first, so a key that a loader no longer
accepts, or a hub that names nodes the example node cannot be, must fail here, not on a
hospital's server.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.hub.registry import load_hub_config
from node.config import check_node_name, load_config
from queries.pathway import RESERVED_NAMES, builtin_pathways
from queries.results import ReleaseRules

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REGIONS = {"nenc", "nwc", "yh", "gm"}


def test_the_example_node_toml_loads_as_documented() -> None:
    config = load_config(DEPLOY / "node.toml")
    assert config.name in REGIONS
    assert config.listen == "0.0.0.0:50051"
    assert set(config.pathways or ()) == set(builtin_pathways())
    # The stated budget is the policy the node enforces, and it is a coherent one.
    assert config.budget.total_rho == 10.0
    assert config.budget.lifetime_rho == 50.0
    assert config.budget.max_rho_per_query <= (config.budget.analyst_rho or 0) <= 10.0
    assert config.release == ReleaseRules(suppress_below=10, round_to=5)
    assert config.consent.national_opt_out
    assert len(config.consent.registers) == 2
    # Every view the access policy names is one the node would serve.
    served = RESERVED_NAMES | set(config.pathways or ())
    assert set(config.access.views) <= served, set(config.access.views) - served
    # Nothing is left to a default path beside the config: an operator sees where it all is.
    assert config.ledger is not None
    assert config.ledger_key is not None
    assert config.crl is not None


def test_the_example_hub_toml_lists_the_four_regions() -> None:
    config = load_hub_config(DEPLOY / "hub.toml")
    names = {n.name for n in config.nodes}
    assert names == REGIONS
    for node in config.nodes:
        assert check_node_name(node.name) == node.name
        host, _, port = node.address.rpartition(":")
        assert host
        assert port == "50051"
        assert node.title != node.name
    assert load_config(DEPLOY / "node.toml").name in names
    # The federation's rules are no looser than the example node's (nodes may only add).
    node_rules = load_config(DEPLOY / "node.toml").release
    assert config.release.suppress_below <= node_rules.suppress_below
