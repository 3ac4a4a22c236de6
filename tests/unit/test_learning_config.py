"""node.toml's [learning]: the SuperLink a node's SuperNode dials, its CA, reviewed FABs."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import LearningConfig, load_config
from queries.errors import ConfigError

MINIMAL = 'name = "york"\nomop = "omop"\nidentity = "id"\n'
HASH = "ab" * 32


def _load(tmp_path: Path, learning: str) -> LearningConfig:
    path = tmp_path / "node.toml"
    path.write_text(MINIMAL + "\n[learning]\n" + learning, encoding="utf-8")
    return load_config(path).learning


def test_no_table_means_no_supernode(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(MINIMAL, encoding="utf-8")
    assert load_config(path).learning == LearningConfig()


def test_a_full_table(tmp_path: Path) -> None:
    learning = _load(
        tmp_path,
        f'superlink = "hub.example.org:9092"\nroot_certificate = "ca/root.pem"\n'
        f'allowed_fabs = ["{HASH.upper()}"]\n',
    )
    assert learning == LearningConfig(
        superlink="hub.example.org:9092",
        root_certificate=tmp_path / "ca" / "root.pem",
        allowed_fabs=(HASH,),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('superlink = "hub.example.org"\n', "must be host:port"),
        ('superlink = "hub:99999"\n', "out of range"),
        ('allowed_fabs = ["abc"]\n', "list of sha256 hashes"),
        ('allowed_fabs = "' + HASH + '"\n', "list of sha256 hashes"),
        ("superlnk = 1\n", "unknown [learning] key(s) ['superlnk']"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert message in str(caught.value)


def test_hub_fleet_and_hub_name(tmp_path: Path) -> None:
    learning = _load(tmp_path, 'hub_fleet = "10.0.0.5:9443"\nhub_name = "hub"\n')
    assert (learning.hub_fleet, learning.hub_name, learning.superlink) == (
        "10.0.0.5:9443",
        "hub",
        None,
    )


@pytest.mark.parametrize(
    ("learning", "message"),
    [
        ('hub_fleet = "hub:9443"\nsuperlink = "hub:9092"\n', "both superlink and hub_fleet"),
        ('hub_fleet = "hub:9443/v1"\n', "learning.hub_fleet must be host:port"),
        ('hub_fleet = "hub:99999"\n', "learning.hub_fleet port 99999"),
        ('hub_fleet = "hub:9443"\nhub_name = "hub; x"\n', "learning.hub_name must be"),
    ],
)
def test_bad_hub_fleet_settings_are_refused(tmp_path: Path, learning: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, learning)
