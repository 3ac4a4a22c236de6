"""`chc-node init` (node.bootstrap) and `chc demo --node NAME=PATH` on custodian data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from coordinator.local import synth
from coordinator.local.demo import custom_node_setups
from node.bootstrap import init_node
from node.cli import app
from node.config import load_config
from node.data.store import OmopStore
from queries.errors import ConfigError
from tests.unit.omop_testdata import REF, example, write, write_lookup


def snapshot(store: OmopStore) -> dict[str, Counter[tuple[Any, ...]]]:
    return {
        name: Counter(tuple(r.values()) for r in store.query(f'SELECT * FROM "{name}"').to_pylist())  # noqa: S608
        for name in store.tables()
    }


def test_init_writes_a_config_that_serves_the_data(tmp_path: Path) -> None:
    folder = tmp_path / "nwc"
    synth.generate_region(synth.region_by_slug("nwc"), 2_000, folder, seed=4)
    reg = tmp_path / "optouts.csv"
    reg.write_text("person_id,date\n1,2024-01-01\n")
    config, report = init_node(
        tmp_path / "node", name="nwc", omop=folder, registers=[reg], pathways=["copd"]
    )
    assert report.ok
    assert any("used as imd_lookup" in f.message for f in report.findings)
    cfg = load_config(config)
    assert cfg.omop == folder.resolve()
    assert cfg.imd_lookup == (folder / synth.LOOKUP_FILE).resolve()
    assert cfg.pathways == ("copd",)
    assert cfg.consent.registers == (reg.resolve(),)
    assert cfg.identity == tmp_path / "node" / "identity"
    store = OmopStore.from_config(cfg, threads=1)
    try:
        assert store.tables() == ["copd", "copd_admissions", "persons", "visits"]
        assert store.query("SELECT count(*) AS n FROM persons").to_pylist() == [{"n": 1_999}]
    finally:
        store.close()
    with pytest.raises(ConfigError, match="exists"):
        init_node(tmp_path / "node", name="nwc", omop=folder)
    init_node(tmp_path / "node", name="nwc", omop=folder, force=True)


def test_init_from_the_command_line(tmp_path: Path) -> None:
    source = write(example(), tmp_path / "omop", "csv", upper=True)
    lookup = write_lookup(tmp_path / "imd.csv")
    runner = CliRunner()
    done = runner.invoke(
        app,
        [
            *("init", str(tmp_path / "n"), "--name", "yh", "--omop", str(source)),
            *("--imd-lookup", str(lookup), "--reference-date", REF.isoformat()),
        ],
    )
    assert done.exit_code == 0, done.output
    assert "data accepted" in done.output
    assert "WARNING condition_occurrence.person_id [1]" in done.output
    assert (tmp_path / "n" / "node.toml").exists()
    # Without the (optional) death table the node serves without mortality outcomes.
    (source / "DEATH.csv").unlink()
    served = runner.invoke(
        app, ["init", str(tmp_path / "m"), "--name", "yh", "--omop", str(source)]
    )
    assert served.exit_code == 0, served.output
    assert "NOTE    death: no such table: mortality outcomes" in served.output
    (source / "VISIT_OCCURRENCE.csv").unlink()
    refused = runner.invoke(
        app, ["init", str(tmp_path / "k"), "--name", "yh", "--omop", str(source)]
    )
    assert refused.exit_code == 1
    assert "ERROR   visit_occurrence: required table missing" in refused.output


def test_init_copy_makes_typed_parquet_with_the_same_views(tmp_path: Path) -> None:
    source = write(example(), tmp_path / "omop", "csv", upper=True, uk_dates=True)
    lookup = write_lookup(tmp_path / "imd.csv")
    config, report = init_node(
        tmp_path / "node", name="n", omop=source, imd_lookup=lookup, reference_date=REF, copy=True
    )
    assert report.ok
    copy = tmp_path / "node" / "omop"
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        f"{t}.parquet"
        for t in ("person", "visit_occurrence", "condition_occurrence", "death", "location")
    )
    assert load_config(config).omop == copy.resolve()
    original = OmopStore(source, [], reference_date=REF, threads=1, imd_lookup=lookup)
    copied = OmopStore.from_config(load_config(config), threads=1)
    try:
        assert snapshot(copied)["persons"] == snapshot(original)["persons"]
        assert snapshot(copied)["visits"] == snapshot(original)["visits"]
    finally:
        original.close()
        copied.close()
    # Refused data is not copied and no node.toml is written.
    (source / "PERSON.csv").unlink()
    config, report = init_node(tmp_path / "other", name="n", omop=source, copy=True)
    assert not report.ok
    assert not config.exists()
    assert not (tmp_path / "other" / "omop").exists()


def test_init_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        init_node(tmp_path / "n", name="n", omop=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="node name"):
        init_node(tmp_path / "n", name="Bad Name", omop=tmp_path)
    with pytest.raises(ConfigError, match="unknown pathway"):
        init_node(tmp_path / "n", name="n", omop=tmp_path, pathways=["cpod"])


def test_demo_nodes_from_data_or_config(tmp_path: Path) -> None:
    folder = tmp_path / "gm"
    synth.generate_region(synth.region_by_slug("gm"), 500, folder, seed=1)
    duck = write(example(), tmp_path / "x.duckdb", "duckdb")
    config, _ = init_node(
        tmp_path / "node", name="yh", omop=duck, imd_lookup=write_lookup(tmp_path / "i.csv")
    )
    setups = custom_node_setups([f"gm={folder}", f"yh={config}", f"x={duck}"])
    assert [s.name for s in setups] == ["gm", "yh", "x"]
    assert setups[0].imd_lookup == folder / synth.LOOKUP_FILE
    assert setups[1].omop == duck.resolve()
    assert setups[1].config == config  # used as it is: the node reads its imd_lookup
    assert setups[2].imd_lookup is None
    for bad, message in [
        ("gm", "NAME=PATH"),
        (f"gm={tmp_path / 'nope'}", "does not exist"),
    ]:
        with pytest.raises(ConfigError, match=message):
            custom_node_setups([bad])
    with pytest.raises(ConfigError, match="differ"):
        custom_node_setups([f"a={folder}", f"a={duck}"])
