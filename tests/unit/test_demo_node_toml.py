"""The demo's node.toml for a custodian's file, and the questions the demo chooses.

The demo (coordinator/) cannot use the node's loader; these tests hold its rules against the
loader (node/config.py) from outside: a custodian's file and the demo's copy of it load to
the same configuration but for the demo-owned keys, and every path key is known.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from datetime import date
from pathlib import Path

import pytest

from coordinator.local import node_toml
from coordinator.local.demo import choose_queries, demo_queries, generic_queries
from coordinator.local.federation import NodeSetup
from node.config import NODE_KEYS, NodeConfig, load_config
from node.data.catalog import build_catalog
from node.data.consent import ConsentPolicy
from queries.errors import ConfigError
from queries.pathway import load_pathways

# Every key a custodian may set, each away from its default, paths relative to the file.
CUSTODIAN = """\
name = "nwc"
omop = "data/omop.duckdb"
identity = "identity"
listen = "0.0.0.0:50051"
reference_date = 2024-03-31
pathways = ["copd", "epilepsy"]
pathways_dir = "../shared/pathways"
imd_lookup = "ref/imd.csv"
omop_schema = "cdm"
crl = "identity/crl.pem"
ledger = "ledger/nwc.sqlite"
ledger_key = "ledger/nwc.key"

[budget]
total_rho = 3.5
max_rho_per_query = 0.25
delta = 1e-7
period = "calendar-year"
analyst_rho = 1.5
lifetime_rho = 12.0

[budget.analysts]
alice = 2.0

[release]
suppress_below = 10
round_to = 10

[access]
analysts = ["alice", "demo-analyst"]
views = ["persons", "copd"]

[access.analyst_views]
alice = ["copd"]

[consent]
registers = ["consent/ndoo.csv", "/abs/local.csv"]
national_opt_out = true
parent_decides_under = 12
own_decision_from = 16
children_need_consent = true
"""


def _paths_of(cls: type) -> set[str]:
    """The fields of a dataclass whose type holds a Path (alone, optional or in a tuple)."""
    hints = typing.get_type_hints(cls)
    return {f.name for f in fields(cls) if "Path" in str(hints[f.name])}


def test_every_path_key_of_the_loader_is_rebased_or_owned() -> None:
    # A path field added to the node's config without a line in node_toml fails here: the
    # demo would otherwise point a relative path at its own workdir.
    handled = set(node_toml.PATH_KEYS) | set(node_toml.OWNED_KEYS)
    assert _paths_of(NodeConfig) <= handled
    assert {key for name, key in node_toml.TABLE_PATH_KEYS if name == "consent"} == _paths_of(
        ConsentPolicy
    )
    assert handled <= NODE_KEYS  # and none of them is a stale name


def test_the_demos_copy_is_the_custodians_config_but_for_the_owned_keys(tmp_path: Path) -> None:
    custodian = tmp_path / "etc" / "chc"
    custodian.mkdir(parents=True)
    theirs_path = custodian / "node.toml"
    theirs_path.write_text(CUSTODIAN)
    work = tmp_path / "demo" / "conf"
    work.mkdir(parents=True)
    table = node_toml.with_owned_keys(
        node_toml.custodian_table(theirs_path, source="--node yh"),
        name="yh",
        identity=tmp_path / "demo" / "pki" / "node" / "yh",
        crl=tmp_path / "demo" / "pki" / "crl.pem",
        listen="127.0.0.1:0",
        ledger=work / "yh.ledger.sqlite",
    )
    ours_path = work / "yh.toml"
    ours_path.write_text(node_toml.dumps(table, comment="a\nb"), encoding="utf-8")
    theirs, ours = load_config(theirs_path), load_config(ours_path)

    for f in fields(NodeConfig):
        if f.name not in node_toml.OWNED_KEYS:
            assert getattr(ours, f.name) == getattr(theirs, f.name), f.name
    # Relative paths still point where they pointed, from the custodian's folder.
    assert ours.omop == custodian / "data" / "omop.duckdb"
    assert ours.pathways_dir == custodian / ".." / "shared" / "pathways"
    assert ours.consent.registers == (custodian / "consent" / "ndoo.csv", Path("/abs/local.csv"))
    assert ours.reference_date == date(2024, 3, 31)
    assert ours.budget.total_rho == 3.5
    # The owned keys are the demo's: nothing of the custodian's identity, CRL or ledger.
    assert (ours.name, ours.listen) == ("yh", "127.0.0.1:0")
    assert ours.identity == (tmp_path / "demo" / "pki" / "node" / "yh").resolve()
    assert ours.crl == (tmp_path / "demo" / "pki" / "crl.pem").resolve()
    assert ours.ledger == (work / "yh.ledger.sqlite").resolve()
    assert ours.ledger_key is None  # the node's default: beside the demo's ledger
    assert ours_path.read_text().startswith("# a\n# b\n")


def test_a_custodians_file_that_does_not_parse_is_refused_naming_the_flag(tmp_path: Path) -> None:
    bad = tmp_path / "node.toml"
    bad.write_text('name = "nwc"\nomop = \n')
    with pytest.raises(ConfigError, match=r"--node nwc=.*: cannot read .* as TOML"):
        node_toml.custodian_table(bad, source="--node nwc=node.toml")


def test_a_setup_from_a_file_takes_no_other_settings(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    NodeSetup(name="a", omop=tmp_path, title="A", config=config)
    with pytest.raises(ValueError, match="settings come from"):
        NodeSetup(name="a", omop=tmp_path, config=config, total_rho=2.0)
    with pytest.raises(ValueError, match="settings come from"):
        NodeSetup(name="a", omop=tmp_path, config=config, pathways=("copd",))


def test_the_demo_asks_the_pathway_questions_only_where_every_node_serves_them() -> None:
    rho = 0.05
    everything = build_catalog(load_pathways(None))
    assert choose_queries(rho, [everything, everything]) == demo_queries(rho)
    # One node without asthma_children: the other pathway questions remain.
    some = build_catalog(load_pathways(["copd", "urgent_care"]))
    chosen = choose_queries(rho, [everything, some])
    assert [q.query.view for q in chosen] == ["copd", "urgent_care", "copd"]
    # A node serving none of the demo's pathways: persons and visits, which every node serves.
    none = build_catalog(load_pathways([]), reference_date=date(2024, 6, 30))
    assert choose_queries(rho, [everything, none]) == generic_queries(rho)
    assert choose_queries(rho, []) == demo_queries(rho)  # nobody said: the usual questions
