"""The Flower app folder of a chc run: a pyproject.toml and nothing else.

`flwr run` builds the FAB (Flower App Bundle) from this folder and the SuperLink hands it to
every SuperNode. A chc FAB carries no code: its components name the ServerApp and ClientApp
modules installed with chc (protocols.flower_wire), and a node refuses any FAB that ships a
file besides pyproject.toml (node/flower/fab_policy.py). Its [tool.flwr.app.config] declares
the run's keys, because `flwr run --run-config` may only override keys the FAB declares.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import tomli_w

from protocols.flower_wire import CLIENT_APP, SERVER_APP
from queries.errors import ConfigError

APP_NAME = "chc-learning"
APP_VERSION = "1.0.0"
PUBLISHER = "chc"

# The keys every chc run declares, with their defaults (all strings; the ServerApp parses).
# "payload" is base64 bytes for the task; "output" the file the ServerApp writes its result
# to; "deadline-s" bounds each exchange; "min-nodes" and "nodes-deadline-s" bound the wait
# for SuperNodes to come online.
DEFAULT_CONFIG: dict[str, str] = {
    "task": "ping",
    "output": "",
    "payload": "",
    "deadline-s": "60",
    "min-nodes": "1",
    "nodes-deadline-s": "60",
}


def write_app(app_dir: Path, config: Mapping[str, str] | None = None) -> Path:
    """Write app_dir/pyproject.toml for a chc run, declaring DEFAULT_CONFIG plus config's keys.

    Refuses a folder that already holds anything else, since `flwr run` would bundle it.
    """
    merged = dict(DEFAULT_CONFIG)
    for key, value in (config or {}).items():
        if not isinstance(value, str):
            raise ConfigError(f"run config {key!r} must be a string, not {type(value).__name__}")
        merged[key] = value
    app_dir.mkdir(parents=True, exist_ok=True)
    others = sorted(p.name for p in app_dir.iterdir() if p.name != "pyproject.toml")
    if others:
        raise ConfigError(
            f"app folder {app_dir} holds {others}; a chc FAB is a pyproject.toml alone and "
            "nodes refuse any other file"
        )
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": APP_NAME,
            "version": APP_VERSION,
            "description": "chc federated learning run (no code: components are installed)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": merged,
                }
            }
        },
    }
    path = app_dir / "pyproject.toml"
    path.write_text(tomli_w.dumps(project), encoding="utf-8")
    return path
