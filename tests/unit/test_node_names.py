"""Node names (node.config): plain names that can never be paths, and matching the node's
certificate; the default ledger stays in node.toml's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.budget.accounting import default_ledger_path
from node.config import NodeConfig, check_node_certificate, check_node_name, load_config
from protocols.security.pki import Role, create_ca, issue, load_identity
from queries.errors import ConfigError

BAD_NAMES: list[object] = [
    "../../evil",
    "/etc/chc/evil",
    "a/b",
    "..",
    ".hidden",
    "Nwc",
    "nwc.region",
    "nwc ",
    "nwc\n",
    "-nwc",
    "1nwc",
    "",
    "n" * 64,
    "\u00e9",
    5,
    None,
]


def write_toml(folder: Path, name: str, extra: str = "") -> Path:
    toml = folder / "node.toml"
    quoted = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    toml.write_text(f'name = "{quoted}"\nomop = "omop"\nidentity = "identity"\n{extra}')
    return toml


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_node_name_must_be_a_plain_name(bad: object) -> None:
    with pytest.raises(ConfigError, match="not a valid node name"):
        check_node_name(bad)
    with pytest.raises(ConfigError, match="not a valid node name"):
        NodeConfig(name=bad, omop=Path("o"), identity=Path("i"))  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [n for n in BAD_NAMES if isinstance(n, str)])
def test_node_toml_with_a_bad_name_is_refused(tmp_path: Path, bad: str) -> None:
    toml = write_toml(tmp_path, bad)
    with pytest.raises(ConfigError, match=r"node\.toml: name .* is not a valid node name"):
        load_config(toml)


def test_a_non_string_name_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text('name = 5\nomop = "omop"\nidentity = "identity"\n')
    with pytest.raises(ConfigError, match="not a valid node name"):
        load_config(toml)


@pytest.mark.parametrize("good", ["nwc", "nenc", "n", "node-1", "north_west", "a" * 63])
def test_good_node_names(tmp_path: Path, good: str) -> None:
    cfg = load_config(write_toml(tmp_path, good))
    assert cfg.name == good
    # The default ledger is in node.toml's folder, named after the node.
    assert default_ledger_path(cfg, tmp_path / "node.toml") == tmp_path / f"{good}.ledger.sqlite"


def test_an_explicit_ledger_path_is_used_as_given(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "nwc.sqlite"
    cfg = load_config(write_toml(tmp_path, "nwc", f'ledger = "{absolute}"\n'))
    assert default_ledger_path(cfg, tmp_path / "node.toml") == absolute
    cfg = load_config(write_toml(tmp_path, "nwc", 'ledger = "ledgers/nwc.sqlite"\n'))
    # Relative, like every path in node.toml: from node.toml's folder.
    assert default_ledger_path(cfg, tmp_path / "node.toml") == tmp_path / "ledgers/nwc.sqlite"


def test_the_certificate_must_be_this_nodes(tmp_path: Path) -> None:
    create_ca(tmp_path / "pki")
    nwc = load_identity(issue(tmp_path / "pki", role=Role.NODE, name="nwc"))
    analyst = load_identity(issue(tmp_path / "pki", role=Role.ANALYST, name="york"))
    cfg = NodeConfig(name="york", omop=tmp_path, identity=tmp_path / "identity")
    with pytest.raises(ConfigError, match=r"name 'york' does not match .* issued to 'nwc'"):
        check_node_certificate(cfg, nwc, "node.toml")
    with pytest.raises(ConfigError, match="holds a analyst certificate, not a node one"):
        check_node_certificate(cfg, analyst, "node.toml")
    check_node_certificate(NodeConfig(name="nwc", omop=tmp_path, identity=tmp_path), nwc, "x")
