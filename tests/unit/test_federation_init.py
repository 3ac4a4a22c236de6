"""`chc federation init` and `chc pki issue`: files every party's loader reads as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.hub.registry import load_hub_config
from node.bootstrap import init_node
from node.config import check_node_certificate, load_config
from protocols.cli import ExitCode
from protocols.security.pki import CA_FILE, Role, load_identity
from tests.unit._cli_helpers import chc, error_line
from tests.unit.omop_testdata import example, write

NODES = ("nenc", "nwc", "yh", "gm")


def _init(folder: Path, *node_args: str, extra: tuple[str, ...] = ()) -> str:
    args = ["federation", "init", str(folder), *extra]
    for n in node_args:
        args += ["--node", n]
    run = chc(*args)
    assert run.exit_code == 0, run.output
    return run.stdout


def test_every_generated_file_loads_and_matches_its_certificate(tmp_path: Path) -> None:
    omop = tmp_path / "omop"
    omop.mkdir()
    fed = tmp_path / "fed"
    out = _init(
        fed,
        f"nenc={omop}@chc-nenc.example.org:6001",
        "nwc",
        "yh=relative/omop",
        "gm@127.0.0.1:6004",
        extra=("--hub", "chc-hub.example.org:6000", "--analyst", "alice"),
    )
    hub = load_hub_config(fed / "hub" / "hub" / "hub.toml")
    assert [(n.name, n.address) for n in hub.nodes] == [
        ("nenc", "chc-nenc.example.org:6001"),
        ("nwc", "127.0.0.1:50052"),
        ("yh", "127.0.0.1:50053"),
        ("gm", "127.0.0.1:6004"),
    ]
    assert hub.listen == "0.0.0.0:6000"  # analysts reach it from other machines
    assert hub.identity == fed / "hub" / "hub" / "identity"
    hub_identity = load_identity(hub.identity)
    assert (hub_identity.role, hub_identity.name) == (Role.HUB, "hub")
    for name in NODES:
        config = fed / "node" / name / "node.toml"
        cfg = load_config(config)
        assert cfg.identity == config.parent / "identity"
        check_node_certificate(cfg, load_identity(cfg.identity), str(config))
    nenc = load_config(fed / "node" / "nenc" / "node.toml")
    assert (nenc.omop, nenc.listen) == (omop.absolute(), "0.0.0.0:6001")
    # A relative --node path is the operator's (from where they ran it), not node.toml's.
    assert load_config(fed / "node" / "yh" / "node.toml").omop == Path.cwd() / "relative/omop"
    assert load_config(fed / "node" / "gm" / "node.toml").listen == "127.0.0.1:6004"
    assert load_identity(fed / "analyst" / "alice").role is Role.ANALYST
    assert load_identity(fed / "auditor" / "auditor").role is Role.AUDITOR
    # The CA's index names where each identity now is (not where it was built).
    folders = {e["name"]: e["folder"] for e in json.loads((fed / "issued.json").read_text())}
    assert folders["alice"] == str(fed / "analyst" / "alice")
    assert f"{fed}/node/nwc/   copy to node nwc's machine; set `omop` in node.toml" in out
    assert "chc hub serve --config" in out
    assert f"--identity {fed}/analyst/alice" in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fed.")]  # no leftovers


def test_a_node_machine_folder_holds_no_ca_key(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    _init(fed, "nenc")
    copied = {p.name for p in (fed / "node" / "nenc").rglob("*")}
    assert copied == {"node.toml", "identity", "cert.pem", "key.pem", "ca.pem"}
    assert (fed / "node" / "nenc" / "identity" / "key.pem").stat().st_mode & 0o077 == 0


def test_an_existing_folder_is_not_overwritten(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    _init(fed, "nenc")
    before = (fed / CA_FILE).read_bytes()
    run = chc("federation", "init", str(fed), "--node", "nenc")
    assert run.exit_code == ExitCode.USAGE
    assert "exists and is not empty" in error_line(run)
    assert "--force" in error_line(run)
    assert (fed / CA_FILE).read_bytes() == before
    _init(fed, "nwc", extra=("--force",))
    assert (fed / CA_FILE).read_bytes() != before  # a new CA
    assert not (fed / "node" / "nenc").exists()
    assert load_config(fed / "node" / "nwc" / "node.toml").name == "nwc"


def test_force_never_deletes_a_ledger_or_a_folder_that_is_not_a_federation(
    tmp_path: Path,
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    run = chc("federation", "init", str(other), "--node", "nenc", "--force")
    assert run.exit_code == ExitCode.USAGE
    assert "not a federation folder" in error_line(run)
    assert (other / "notes.txt").read_text() == "keep me"
    fed = tmp_path / "fed"
    _init(fed, "nenc")
    ledger = fed / "node" / "nenc" / "nenc.ledger.sqlite"
    ledger.write_bytes(b"")
    run = chc("federation", "init", str(fed), "--node", "nenc", "--force")
    assert run.exit_code == ExitCode.USAGE
    assert "privacy ledger" in error_line(run)
    assert ledger.exists()


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (["Nenc"], "'Nenc' is not a valid node name"),
        (["nenc="], "give the OMOP path after '='"),
        (["nenc", "nenc"], "--node names repeat"),
        (["a@h:7000", "b@h:7000"], "two nodes share an address"),
        (["a@h:70000"], "port 70000 is not 1-65535"),
    ],
)
def test_bad_nodes_are_refused_naming_the_flag(
    tmp_path: Path, nodes: list[str], message: str
) -> None:
    args = ["federation", "init", str(tmp_path / "fed")]
    for n in nodes:
        args += ["--node", n]
    run = chc(*args)
    assert run.exit_code == ExitCode.USAGE
    assert message in error_line(run)
    assert not (tmp_path / "fed").exists()


def test_pki_issue_writes_where_node_toml_and_identity_flags_look(tmp_path: Path) -> None:
    ca = tmp_path / "pki"
    assert chc("pki", "init", str(ca)).exit_code == 0
    run = chc("pki", "issue", str(ca), "--role", "node", "--name", "nwc")
    assert run.exit_code == 0, run.output
    assert f"in {ca}/node/nwc/identity" in run.stdout
    # `chc-node init` beside it writes identity = "identity": the certificate just issued.
    omop = write(example(), tmp_path / "omop")
    config, report = init_node(ca / "node" / "nwc", name="nwc", omop=omop)
    assert report.ok, report.render()
    cfg = load_config(config)
    check_node_certificate(cfg, load_identity(cfg.identity), str(config))
    run = chc("pki", "issue", str(ca), "--role", "analyst", "--name", "alice")
    assert run.exit_code == 0, run.output
    assert f"use it as --identity {ca}/analyst/alice" in run.stdout
    assert load_identity(ca / "analyst" / "alice").name == "alice"


def test_pki_issue_renews_a_generated_node_in_place(tmp_path: Path) -> None:
    fed = tmp_path / "fed"
    _init(fed, "nenc")
    before = (fed / "node" / "nenc" / "identity" / "cert.pem").read_bytes()
    run = chc("pki", "issue", str(fed), "--role", "node", "--name", "nenc")
    assert run.exit_code == 0, run.output
    cfg = load_config(fed / "node" / "nenc" / "node.toml")
    assert (cfg.identity / "cert.pem").read_bytes() != before
    check_node_certificate(cfg, load_identity(cfg.identity), "node.toml")
