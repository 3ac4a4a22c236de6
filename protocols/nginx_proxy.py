"""nginx as the mutual-TLS proxy in front of Flower's Fleet API, on the hub and on a node.

Flower 1.42 serves its unauthenticated Control API on the same port as the Fleet API and its
SuperNode cannot present a client certificate, so the SuperLink listens on loopback and two
nginx configurations carry the Fleet traffic (docs/training.md, "Closing the Control API"):
the hub's proxy, which forwards /v1/fleet/ only and only for a node certificate, and each
node's forwarder, which adds the node's certificate. The templates are deploy/flower/'s files,
shipped here as package data; render_* fills them and NginxProxy runs one as a child.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from protocols.flower_process import FlowerChild, FlowerStartError, Started, tail, wait_listening
from queries.errors import ConfigError

log = logging.getLogger("chc.nginx")

TEMPLATES = Path(__file__).parent / "nginx_templates"
HUB_TEMPLATE = "hub-fleet-proxy.conf"
NODE_TEMPLATE = "node-fleet-forward.conf"
START_TIMEOUT_S = 15.0
CHECK_TIMEOUT_S = 30.0
INSTALL_HINT = "install it (`make system-deps`, or `apt-get install nginx-light`)"

# Characters a value may hold and stay one nginx token: no quotes, ';', braces, '$', '#',
# whitespace or backslash, any of which would end or rewrite a directive.
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+@%=,:-]+")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_LISTEN = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]|\*):([0-9]{1,5})")
_PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
# Temp-path directives whose module a build may leave out (an unknown directive is fatal).
_OPTIONAL_MODULES = {
    "fastcgi_temp_path": "http_fastcgi_module",
    "uwsgi_temp_path": "http_uwsgi_module",
    "scgi_temp_path": "http_scgi_module",
}


class NginxStartError(FlowerStartError):
    """nginx is missing, refused its configuration, or did not listen in time."""


def template(name: str) -> str:
    """The text of a packaged template (HUB_TEMPLATE or NODE_TEMPLATE)."""
    return (TEMPLATES / name).read_text(encoding="utf-8")


def _path(value: Path | str, what: str) -> str:
    text = str(value)
    if not _SAFE_PATH.fullmatch(text):
        raise ConfigError(
            f"{what} {text[:120]!r} cannot go into an nginx configuration: use a path of "
            "letters, digits and ./_-+@%=,: only (no spaces, quotes, ';', '$', '#' or newlines)"
        )
    return text


def _port(value: int, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{what} must be a port number in 1-65535, not {value!r}")
    return str(value)


def _host(value: str, what: str) -> str:
    if not isinstance(value, str) or not _HOST.fullmatch(value):
        raise ConfigError(f"{what} must be a host name or IPv4 address, not {str(value)[:80]!r}")
    return value


def _listen(value: str, what: str) -> str:
    match = _LISTEN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f'{what} must be host:port (e.g. "0.0.0.0:9443"), not {value!r}')
    _port(int(match.group(1)), f"{what}'s port")
    return value


def render(name: str, values: dict[str, str]) -> str:
    """Fill template name's {{NAME}} placeholders; every one must be given and used."""
    text = template(name)
    wanted = set(_PLACEHOLDER.findall(text))
    if wanted != set(values):
        raise ConfigError(
            f"template {name}: placeholders {sorted(wanted)} but values for {sorted(values)}"
        )
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def render_hub_proxy(
    *,
    workdir: Path,
    listen: str,
    server_cert: Path,
    server_key: Path,
    ca: Path,
    superlink_port: int,
    superlink_tls_name: str = "localhost",
) -> str:
    """The hub's Fleet proxy: mutual TLS on listen, /v1/fleet/ of node certificates only.

    superlink_tls_name is the name the SuperLink's certificate must carry (its certificate
    from SuperLinkTls.issue names localhost; nginx checks DNS names, not IP addresses).
    """
    return render(
        HUB_TEMPLATE,
        {
            "WORKDIR": _path(workdir, "the proxy's working folder"),
            "LISTEN": _listen(listen, "the proxy's listen address"),
            "SERVER_CERT": _path(server_cert, "the hub's certificate"),
            "SERVER_KEY": _path(server_key, "the hub's key"),
            "CA": _path(ca, "the federation CA"),
            "SUPERLINK_PORT": _port(superlink_port, "the SuperLink's port"),
            "SUPERLINK_TLS_NAME": _host(superlink_tls_name, "the SuperLink's TLS name"),
        },
    )


def render_node_forward(
    *,
    workdir: Path,
    local_port: int,
    server_cert: Path,
    server_key: Path,
    node_cert: Path,
    node_key: Path,
    ca: Path,
    hub_address: str,
    hub_name: str,
) -> str:
    """A node's forwarder: TLS on 127.0.0.1:local_port, to the hub's proxy as the node.

    server_cert must be valid for 127.0.0.1 and chain to the CA the SuperNode trusts (a node
    identity's certificate is); hub_name is the name the hub's certificate must carry.
    """
    return render(
        NODE_TEMPLATE,
        {
            "WORKDIR": _path(workdir, "the forwarder's working folder"),
            "LOCAL_PORT": _port(local_port, "the forwarder's port"),
            "SERVER_CERT": _path(server_cert, "the forwarder's certificate"),
            "SERVER_KEY": _path(server_key, "the forwarder's key"),
            "NODE_CERT": _path(node_cert, "the node's certificate"),
            "NODE_KEY": _path(node_key, "the node's key"),
            "CA": _path(ca, "the federation CA"),
            "HUB_ADDRESS": _listen(hub_address, "the hub's Fleet proxy address"),
            "HUB_NAME": _host(hub_name, "the hub's certificate name"),
        },
    )


def find_nginx() -> Path:
    """The nginx binary on PATH or in /usr/sbin; raise NginxStartError if there is none."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise NginxStartError(f"nginx is not installed (the Fleet proxy needs it): {INSTALL_HINT}")
    return Path(found)


def _drop_unbuilt(conf: str, nginx: Path) -> str:
    """Remove temp-path lines of modules this nginx was built without (`nginx -V`)."""
    done = subprocess.run(  # noqa: S603 - our argv, no shell
        [str(nginx), "-V"], capture_output=True, text=True, timeout=CHECK_TIMEOUT_S, check=False
    )
    built = done.stdout + done.stderr
    dropped = {d for d, module in _OPTIONAL_MODULES.items() if f"--without-{module}" in built}
    lines = [ln for ln in conf.splitlines() if ln.strip().split(" ", 1)[0] not in dropped]
    return "\n".join(lines) + "\n"


class NginxProxy(Started):
    """One nginx master (worker_processes 1) run as a child from a rendered configuration.

    Everything it writes (the configuration, pid, logs, temporary files) goes under workdir;
    port is the one it listens on (for the readiness wait).
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        conf: str,
        port: int,
        *,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.conf = conf
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._child: FlowerChild | None = None

    @property
    def conf_path(self) -> Path:
        """Where the rendered configuration is written."""
        return self.workdir / f"{self.name}.conf"

    @property
    def error_log(self) -> Path:
        """nginx's error log, as the templates name it."""
        return self.workdir / "error.log"

    def _argv(self, nginx: Path, *extra: str) -> list[str]:
        argv = [str(nginx), "-p", f"{self.workdir}/", "-c", str(self.conf_path)]
        if os.geteuid() == 0:
            # Started as root (a CI container), nginx would run its worker as nobody, which
            # cannot enter a private workdir for its temporary files; a service runs it as
            # the unprivileged user that owns the keys instead, and then this is not added.
            argv += ["-g", "user root;"]
        return argv + list(extra)

    def start(self) -> None:
        """Check the configuration with `nginx -t`, start nginx, wait until port listens."""
        nginx = find_nginx()
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(_drop_unbuilt(self.conf, nginx), encoding="utf-8")
        checked = subprocess.run(  # noqa: S603 - our argv, no shell
            self._argv(nginx, "-t", "-q"),
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
        if checked.returncode != 0:
            raise NginxStartError(
                f"nginx refused the {self.name} configuration {self.conf_path} "
                f"(`nginx -t` exited with {checked.returncode}):\n"
                f"{(checked.stderr + checked.stdout).strip() or tail(self.error_log)}"
            )
        child = FlowerChild(
            self.name, self._argv(nginx), dict(os.environ), self.workdir / "nginx.out"
        )
        child.start()
        self._child = child
        try:
            wait_listening(child, self.port, self.start_timeout_s)
        except FlowerStartError as exc:
            child.stop()
            raise NginxStartError(
                f"{exc}\nnginx's error log ({self.error_log}):\n{tail(self.error_log)}"
            ) from None
        log.info("%s (nginx) listening on port %d (logs in %s)", self.name, self.port, self.workdir)

    def stop(self) -> None:
        """Stop nginx (SIGTERM: a fast shutdown of the master and its worker)."""
        if self._child is not None:
            self._child.stop()

    def running(self) -> bool:
        """Whether the nginx master is alive."""
        return self._child is not None and self._child.running()

    def exited(self) -> str | None:
        """How nginx exited, with the end of its error log, or None while it runs."""
        if self._child is None or self._child.returncode() is None:
            return None
        return (
            f"{self.name} (nginx) exited with code {self._child.returncode()}; "
            f"its error log ({self.error_log}):\n{tail(self.error_log)}"
        )
