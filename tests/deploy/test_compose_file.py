"""deploy/compose/compose.yaml against the Compose Specification's JSON schema, and sense.

The schema is the compose-spec project's `compose-spec.json` as vendored by the PyPI
package check-jsonschema (a dev dependency; its licence is beside it in the package,
builtin_schemas/vendor/licenses/LICENSE.compose-spec), read from the installed package,
never fetched. `docker compose config` is not used: Docker's compose plugin is in no
registry reachable here, and Debian 12's docker-compose is the retired 1.29 Python
implementation, which lacks parts of the current specification (top-level `name`, ...).
"""

from __future__ import annotations

import copy
import json
from importlib.resources import files
from typing import Any

import jsonschema
import pytest

from tests.deploy import _containers as c

NODES = ("nenc", "nwc", "yh", "gm")


def _schema() -> dict[str, Any]:
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


def _errors(doc: dict[str, Any]) -> list[str]:
    schema = _schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_the_compose_file_is_valid_under_the_compose_specification() -> None:
    assert _errors(c.load_compose()) == []


def test_the_schema_check_refuses_what_compose_would_refuse() -> None:
    # The check can fail: a misspelt key and a wrong type are both errors.
    doc = copy.deepcopy(c.load_compose())
    doc["services"]["nenc"]["readonly"] = True
    doc["services"]["hub"]["ports"] = "50050:50050"
    errors = _errors(doc)
    assert any("readonly" in e for e in errors), errors
    assert any("ports" in e for e in errors), errors


def test_every_reference_exists_and_every_service_is_hardened() -> None:
    compose = c.load_compose()
    services = compose["services"]
    assert set(services) == {"bootstrap", "hub", *NODES}
    for name, spec in services.items():
        for kind in ("secrets", "configs"):
            for ref in spec.get(kind, []):
                assert ref["source"] in compose[kind], f"{name}: {kind} {ref['source']}"
                assert ref["target"].startswith("/etc/chc/"), f"{name}: {ref['target']}"
        for volume in spec.get("volumes", []):
            if volume["type"] == "volume":
                assert volume["source"] in compose["volumes"], f"{name}: {volume['source']}"
            else:
                assert volume["source"].startswith("./"), f"{name}: binds stay in the folder"
        for dependency, condition in c.depends(spec).items():
            assert dependency in services, f"{name} depends on {dependency}"
            assert condition in ("service_healthy", "service_completed_successfully")
        # Nobody runs as root; nothing can gain privileges or write outside its volumes.
        user = str(spec.get("user", ""))
        assert user, f"{name}: no user"
        assert user.split(":")[0] not in ("0", "root"), f"{name}: user {user!r}"
        assert spec["read_only"] is True, name
        assert spec["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in spec["security_opt"], name
        assert "privileged" not in spec, name
        assert "cap_add" not in spec, name
        # A health check, except for the one-shot job others wait to complete.
        if name == "bootstrap":
            assert spec["healthcheck"] == {"disable": True}
        else:
            assert spec["healthcheck"]["test"][0] == "CMD", name


def test_keys_are_secrets_and_each_node_sees_only_its_own() -> None:
    compose = c.load_compose()
    keys = {name for name, s in compose["secrets"].items() if s["file"].endswith("key.pem")}
    assert keys == {f"{n}-key" for n in (*NODES, "hub")}
    # The CA's key never reaches a service: it stays with the operator.
    files_ = [s["file"] for s in (*compose["secrets"].values(), *compose["configs"].values())]
    assert not any(f.endswith("ca.key") for f in files_)
    for name in (*NODES, "hub"):
        spec = compose["services"][name]
        mounted = {ref["source"] for ref in spec["secrets"]}
        assert mounted == {f"{name}-key", f"{name}-cert", "ca"}, name
        writable = [
            v for v in spec.get("volumes", []) if v["type"] == "volume" and not v.get("read_only")
        ]
        if name == "hub":
            assert writable == []  # the hub keeps no state
        else:
            assert [v["source"] for v in writable] == [f"{name}-ledger"]
            assert writable[0]["target"] == "/var/lib/chc"


@pytest.mark.parametrize("name", [*NODES, "hub"])
def test_stop_grace_is_above_the_drain(name: str) -> None:
    spec = c.load_compose()["services"][name]
    assert spec["stop_signal"] == "SIGTERM"
    # drain_grace_s defaults to 30 s, then up to 5 s for handlers (docs/observability.md).
    assert int(str(spec["stop_grace_period"]).rstrip("s")) > 30 + 5


def test_only_the_hub_publishes_a_port() -> None:
    services = c.load_compose()["services"]
    published = {name: spec["ports"] for name, spec in services.items() if "ports" in spec}
    assert published == {"hub": ["50050:50050"]}
