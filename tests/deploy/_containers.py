"""Running a compose service's own command on this machine, without a container engine.

There is no Docker engine here, so the images are not built; what the containers would run
is run instead, taken from the files themselves, never retyped: the command is the
service's `entrypoint`/`command` in compose.yaml, or else the ENTRYPOINT/CMD of its image's
target in deploy/docker/Dockerfile; its health check is the service's `healthcheck.test`.

A container sees its own filesystem and network. On one machine, each service gets:

- a root folder in which every mount of the service (volumes, binds, secrets, configs) is
  a symbolic link at its container path to what compose would mount there, and absolute
  container paths in the command, the environment and the mounted .toml configs are moved
  under that root (the .toml files become rewritten copies: they name container paths);
- its own loopback ports: `0.0.0.0:P` and `127.0.0.1:P` in that service become a free port
  of its own, and `SERVICE:P` (compose's DNS name of another service) becomes that
  service's port, so that four nodes can all "listen on 50051" side by side.

Nothing else is changed: same executables (the venv's console scripts, as the image's
PATH puts /opt/chc/venv/bin first), same arguments, same order of start-up.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
VENV_BIN = Path(sys.executable).parent

_LOOPBACK_PORT = re.compile(r"\b(?:0\.0\.0\.0|127\.0\.0\.1):(\d{1,5})\b")
_QUOTED_PATH = re.compile(r'"(/[^"]*)"')


def load_compose() -> dict[str, Any]:
    """compose.yaml as compose reads it (YAML merge keys resolved by the safe loader)."""
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def image_stage(target: str) -> dict[str, list[str]]:
    """ENTRYPOINT and CMD (exec form) of one target of the Dockerfile, and its ancestors'."""
    parser = DockerfileParser(str(DOCKERFILE))
    stages: dict[str, dict[str, list[str]]] = {}
    parents: dict[str, str] = {}
    current = ""
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "FROM":
            base, _, name = value.partition(" AS ")
            current = name.strip() or base.strip()
            parents[current] = base.strip()
            stages[current] = {}
        elif instruction in ("ENTRYPOINT", "CMD"):
            parsed = yaml.safe_load(value)  # exec form is a JSON array
            assert isinstance(parsed, list), f"{instruction} {value}: use the exec (JSON) form"
            stages[current][instruction] = [str(v) for v in parsed]
    merged: dict[str, list[str]] = {}
    chain = [target]
    while chain[-1] in parents and parents[chain[-1]] in stages:
        chain.append(parents[chain[-1]])
    for stage in reversed(chain):
        merged.update(stages[stage])
    return merged


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ports:
    """Each service's container ports, as distinct free loopback ports of this machine."""

    services: frozenset[str]
    mapped: dict[tuple[str, int], int] = field(default_factory=dict)

    def host_port(self, service: str, port: int) -> int:
        """The loopback port standing for service's container port."""
        if (service, port) not in self.mapped:
            self.mapped[(service, port)] = free_port()
        return self.mapped[(service, port)]

    def translate(self, service: str, text: str) -> str:
        """Loopback and compose-DNS addresses in text, as seen from inside service."""
        taken = set(self.mapped.values())

        def own(m: re.Match[str]) -> str:
            port = int(m[1])
            # Already a host port (written by a command this mapping ran): leave it.
            return m[0] if port in taken else f"127.0.0.1:{self.host_port(service, port)}"

        text = _LOOPBACK_PORT.sub(own, text)
        for other in self.services:

            def dns(m: re.Match[str], other: str = other) -> str:
                return f"127.0.0.1:{self.host_port(other, int(m[1]))}"

            text = re.sub(rf"(?<![\w.-]){re.escape(other)}:(\d{{1,5}})\b", dns, text)
        return text


@dataclass
class Service:
    """One compose service laid out on this machine (see the module docstring)."""

    name: str
    spec: dict[str, Any]
    root: Path
    project: Path
    ports: Ports
    mounts: dict[str, Path]

    def path(self, container_path: str) -> str:
        """Where a container path of this service is on this machine."""
        for target in sorted(self.mounts, key=len, reverse=True):
            if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
                return str(self.root) + container_path
        return container_path

    def translate(self, text: str) -> str:
        """Container paths and addresses in text, for this machine."""
        text = self.ports.translate(self.name, text)
        if text.startswith("/"):
            return self.path(text)
        return _QUOTED_PATH.sub(lambda m: '"' + self.path(m[1]) + '"', text)

    def argv(self) -> list[str]:
        """The service's command: compose's entrypoint/command, else its image target's."""
        target = self.spec.get("build", {}).get("target", "")
        image = image_stage(target) if target else {}
        entrypoint = self.spec.get("entrypoint", image.get("ENTRYPOINT", []))
        command = self.spec.get("command", image.get("CMD", []))
        if isinstance(entrypoint, str):
            entrypoint = shlex.split(entrypoint)
        if isinstance(command, str):
            command = shlex.split(command)
        argv = [self.translate(str(a)) for a in [*entrypoint, *command]]
        return [_executable(argv[0]), *argv[1:]]

    def healthcheck(self) -> list[str]:
        """The healthcheck's command (CMD form), translated."""
        test = self.spec["healthcheck"]["test"]
        assert test[0] == "CMD", f"{self.name}: healthcheck.test should be the exec form"
        argv = [self.translate(str(a)) for a in test[1:]]
        return [_executable(argv[0]), *argv[1:]]

    def env(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """The image's environment (venv first on PATH, HOME on /tmp) and the service's own."""
        tmp = self.root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(tmp),
            "TMPDIR": str(tmp),
            "MPLCONFIGDIR": str(tmp / "matplotlib"),
            "PYTHONUNBUFFERED": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        for key, value in (self.spec.get("environment") or {}).items():
            env[key] = self.translate(str(value))
        env.update(overrides or {})
        return env

    def popen(self, log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start the service's command, output to log, in its (image) working folder."""
        with log.open("wb") as out:
            return subprocess.Popen(
                self.argv(),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=kwargs.pop("env", None) or self.env(),
                cwd=self.root / "tmp",
                **kwargs,
            )

    def healthy(self, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """Run the health check once."""
        return subprocess.run(
            self.healthcheck(),
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )


def _executable(name: str) -> str:
    """argv[0] as the image's PATH finds it: the venv's console scripts and python first."""
    if "/" in name:
        return name
    found = VENV_BIN / name
    return str(found) if found.exists() else name


def lay_out(
    compose: dict[str, Any], name: str, *, project: Path, volumes: Path, ports: Ports
) -> Service:
    """Service name's root folder: each of its mounts linked at its container path."""
    spec = compose["services"][name]
    root = project.parent / f"root-{name}"
    mounts: dict[str, Path] = {}
    for volume in spec.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            kind = "bind" if source.startswith((".", "/")) else "volume"
            volume = {"type": kind, "source": source, "target": target}
        source = volume["source"]
        host = project / source if volume["type"] == "bind" else volumes / source
        if volume["type"] == "volume":
            host.mkdir(parents=True, exist_ok=True)
        mounts[volume["target"]] = host
    for kind in ("secrets", "configs"):
        for ref in spec.get(kind, []):
            mounts[ref["target"]] = project / compose[kind][ref["source"]]["file"]
    service = Service(name, spec, root, project, ports, mounts)
    for target, host in mounts.items():
        link = root / target.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(host)
    return service


def materialise_configs(service: Service) -> None:
    """Replace the links to the service's .toml configs by copies naming this machine's paths.

    Done once the files exist (after the bootstrap): they name container paths (the ledger
    on /var/lib/chc, the CRL on /etc/chc/crl) and addresses (nenc:50051), as seen inside.
    """
    for ref in service.spec.get("configs", []):
        link = service.root / ref["target"].lstrip("/")
        text = link.read_text(encoding="utf-8")
        link.unlink()
        link.write_text(
            "\n".join(service.translate(line) for line in text.splitlines()) + "\n",
            encoding="utf-8",
        )


def depends(spec: dict[str, Any]) -> dict[str, str]:
    """A service's depends_on as {service: condition}."""
    raw = spec.get("depends_on", {})
    if isinstance(raw, Sequence) and not isinstance(raw, str):
        return {str(s): "service_started" for s in raw}
    return {str(k): str(v.get("condition", "service_started")) for k, v in raw.items()}
