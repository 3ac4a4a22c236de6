"""Node configuration: reading node.toml (node.config.load_config), its [budget] included."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from node.config import NodeConfig, load_config
from protocols.budget.policy import BudgetPolicy
from queries.errors import ChcError, ConfigError

GOOD = """
name = "leeds"
omop = "data/omop"
identity = "pki/node/leeds"
listen = "0.0.0.0:6000"
reference_date = 2024-03-31
pathways = ["copd", "asthma_children"]

[budget]
total_rho = 5.0
max_rho_per_query = 0.5
delta = 1e-7
"""
MINIMAL = 'name = "york"\nomop = "omop"\nidentity = "id"\n'


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_good_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config == NodeConfig(
        name="leeds",
        omop=tmp_path / "data" / "omop",
        identity=tmp_path / "pki" / "node" / "leeds",
        listen="0.0.0.0:6000",
        reference_date=date(2024, 3, 31),
        pathways=("copd", "asthma_children"),
        budget=BudgetPolicy(total_rho=5.0, max_rho_per_query=0.5, delta=1e-7),
    )


def test_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.listen == "127.0.0.1:50051"
    assert config.reference_date is None  # the end of the data (node/data/reference.py)
    assert config.pathways is None
    assert config.budget == BudgetPolicy()


def test_relative_paths_are_taken_from_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "chc"
    conf_dir.mkdir(parents=True)
    path = write(conf_dir, MINIMAL)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    config = load_config(path)
    assert config.omop == conf_dir / "omop"
    assert config.identity == conf_dir / "id"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    omop = tmp_path / "elsewhere" / "omop"
    path = write(tmp_path, f'name = "n"\nomop = "{omop}"\nidentity = "/srv/chc/id"\n')
    config = load_config(path)
    assert config.omop == omop
    assert config.identity == Path("/srv/chc/id")


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist.*chc-node init"):
        load_config(tmp_path / "nope.toml")


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "name = \n"))


def test_unknown_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['budgte'\]"):
        load_config(write(tmp_path, MINIMAL + "budgte = 1\n"))
    with pytest.raises(ConfigError, match=r"unknown \[budget\] key\(s\) \['total'\]"):
        load_config(write(tmp_path, MINIMAL + "[budget]\ntotal = 1.0\n"))


@pytest.mark.parametrize("key", ["name", "omop", "identity"])
def test_missing_keys_are_named(tmp_path: Path, key: str) -> None:
    text = "\n".join(line for line in MINIMAL.splitlines() if not line.startswith(key))
    with pytest.raises(ConfigError, match=f"missing required key '{key}'"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "line",
    [
        "total_rho = 0",
        "total_rho = -1.0",
        "total_rho = nan",
        "total_rho = inf",
        'total_rho = "ten"',
        "max_rho_per_query = 0.0",
        "max_rho_per_query = -inf",
        "delta = 0.0",
        "delta = 1.0",
        "delta = 1.5",
        "delta = nan",
        "delta = false",
    ],
)
def test_bad_budget_values(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError, match="budget"):
        load_config(write(tmp_path, MINIMAL + f"[budget]\n{line}\n"))


@pytest.mark.parametrize(
    "line",
    ["total_rho = true", "max_rho_per_query = true", 'delta = "1e-6"', "delta = [0.1]"],
)
def test_budget_values_of_the_wrong_type_are_config_errors(tmp_path: Path, line: str) -> None:
    # BUG: BudgetPolicy checks isinstance(value, int | float), which admits bools (TOML
    # `true` becomes a budget of 1.0), and compares delta with `0 < delta < 1` before checking
    # its type, so a string or array delta raises TypeError instead of ConfigError.
    with pytest.raises(ConfigError, match="budget"):
        load_config(write(tmp_path, MINIMAL + f"[budget]\n{line}\n"))


def test_budget_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[budget\] must be a table"):
        load_config(write(tmp_path, MINIMAL + "budget = 5\n"))


@pytest.mark.parametrize(
    "value", ['"2025-12-31"', "2025", "12:00:00", "[2025, 12, 31]", '"yesterday"']
)
def test_bad_reference_date(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="reference_date must be a TOML date"):
        load_config(write(tmp_path, MINIMAL + f"reference_date = {value}\n"))


@pytest.mark.parametrize("value", ["2025-12-31T00:00:00", "2025-12-31T10:00:00Z"])
def test_a_date_time_is_not_a_reference_date(tmp_path: Path, value: str) -> None:
    # BUG: TOML date-times load as datetime, a subclass of date, so they pass the
    # isinstance(ref, date) check and NodeConfig.reference_date holds a datetime (comparisons
    # with dates then raise TypeError). Refuse them, or keep only .date().
    try:
        config = load_config(write(tmp_path, MINIMAL + f"reference_date = {value}\n"))
    except ConfigError:
        return
    assert type(config.reference_date) is date


@pytest.mark.parametrize("value", ['"copd"', "[1, 2]", '["copd", 3]'])
def test_bad_pathways(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="pathways must be a list"):
        load_config(write(tmp_path, MINIMAL + f"pathways = {value}\n"))


@pytest.mark.parametrize(("key", "value"), [("omop", '""'), ("omop", "3"), ("identity", "[]")])
def test_bad_paths(tmp_path: Path, key: str, value: str) -> None:
    lines = [f"{key} = {value}" if line.startswith(key) else line for line in MINIMAL.splitlines()]
    with pytest.raises(ConfigError, match=f"{key} must be a path string"):
        load_config(write(tmp_path, "\n".join(lines) + "\n"))


def test_config_errors_are_value_errors() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigError, ChcError)


def test_lifetime_caps_are_read_from_node_toml(tmp_path: Path) -> None:
    text = MINIMAL + (
        "[budget]\ntotal_rho = 4.0\nanalyst_rho = 1.0\nlifetime_rho = 12.0\n"
        "analyst_lifetime_rho = 3.0\n[budget.analysts]\nalice = 2.0\n"
        "[budget.analysts_lifetime]\nalice = 6.0\n"
    )
    budget = load_config(write(tmp_path, text)).budget
    assert budget == BudgetPolicy(
        total_rho=4.0,
        analyst_rho=1.0,
        analysts=(("alice", 2.0),),
        lifetime_rho=12.0,
        analyst_lifetime_rho=3.0,
        analysts_lifetime=(("alice", 6.0),),
    )
    assert (budget.lifetime_cap, budget.analyst_lifetime_cap("alice")) == (12.0, 6.0)
    assert budget.analyst_lifetime_cap("bob") == 3.0


@pytest.mark.parametrize(
    "line",
    [
        "lifetime_rho = 0",
        "lifetime_rho = -1.0",
        "lifetime_rho = inf",
        "lifetime_rho = true",
        'analyst_lifetime_rho = "5"',
        "analyst_lifetime_rho = nan",
    ],
)
def test_bad_lifetime_caps(tmp_path: Path, line: str) -> None:
    with pytest.raises(ConfigError, match=r"budget\.\w*lifetime_rho must be a positive number"):
        load_config(write(tmp_path, MINIMAL + f"[budget]\n{line}\n"))


def test_bad_per_analyst_lifetime_caps(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"budget\.analysts_lifetime\.alice must be a positive"):
        load_config(write(tmp_path, MINIMAL + "[budget.analysts_lifetime]\nalice = 0\n"))
    with pytest.raises(ConfigError, match=r"\[budget\.analysts_lifetime\] must be a table"):
        load_config(write(tmp_path, MINIMAL + "[budget]\nanalysts_lifetime = 3\n"))
