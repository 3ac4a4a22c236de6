"""Rendering the Fleet proxy configurations: values land where they should, unsafe ones never."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.config import load_config
from node.flower.forwarder import fleet_forwarder_for
from protocols.nginx_proxy import (
    HUB_TEMPLATE,
    NODE_TEMPLATE,
    TEMPLATES,
    NginxProxy,
    NginxStartError,
    _drop_unbuilt,
    find_nginx,
    render_hub_proxy,
    render_node_forward,
)
from queries.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "flower"


def _hub(**changes: object) -> str:
    values: dict[str, object] = {
        "workdir": Path("/srv/chc/fleet"),
        "listen": "0.0.0.0:9443",
        "server_cert": Path("/etc/chc/identity/cert.pem"),
        "server_key": Path("/etc/chc/identity/key.pem"),
        "ca": Path("/etc/chc/identity/ca.pem"),
        "superlink_port": 9092,
    }
    values.update(changes)
    return render_hub_proxy(**values)  # type: ignore[arg-type]


def _node(**changes: object) -> str:
    values: dict[str, object] = {
        "workdir": Path("/var/lib/chc/nwc.flower/fleet_forward"),
        "local_port": 19092,
        "server_cert": Path("/etc/chc/identity/cert.pem"),
        "server_key": Path("/etc/chc/identity/key.pem"),
        "node_cert": Path("/etc/chc/identity/cert.pem"),
        "node_key": Path("/etc/chc/identity/key.pem"),
        "ca": Path("/etc/chc/identity/ca.pem"),
        "hub_address": "chc-hub.example.nhs.uk:9443",
        "hub_name": "chc-hub.example.nhs.uk",
    }
    values.update(changes)
    return render_node_forward(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [HUB_TEMPLATE, NODE_TEMPLATE])
def test_the_packaged_templates_are_the_deploy_files(name: str) -> None:
    assert (TEMPLATES / name).read_text() == (DEPLOY / name).read_text(), (
        f"protocols/nginx_templates/{name} differs from deploy/flower/{name}: copy one over "
        "the other"
    )


def test_the_hub_proxy_forwards_only_the_fleet_api_of_node_certificates() -> None:
    conf = _hub()
    assert "{{" not in conf
    assert "listen 0.0.0.0:9443 ssl;" in conf
    assert "ssl_certificate /etc/chc/identity/cert.pem;" in conf
    assert "ssl_client_certificate /etc/chc/identity/ca.pem;" in conf
    assert "ssl_verify_client on;" in conf
    assert "proxy_pass https://127.0.0.1:9092/v1/fleet/;" in conf
    assert "proxy_ssl_verify on;" in conf
    assert "proxy_ssl_name localhost;" in conf
    assert conf.count("proxy_pass") == 1
    assert "OU=node" in conf
    assert "location /v1/fleet/ {" in conf
    assert "location / {" in conf
    assert "daemon off;" in conf
    assert "pid /srv/chc/fleet/nginx.pid;" in conf
    assert "error_log /srv/chc/fleet/error.log" in conf
    assert "client_body_temp_path /srv/chc/fleet/tmp/client_body;" in conf
    assert "/var/" not in conf


def test_the_node_forwarder_presents_the_node_certificate_to_the_hub() -> None:
    conf = _node()
    assert "{{" not in conf
    assert "listen 127.0.0.1:19092 ssl;" in conf
    assert "proxy_pass https://chc-hub.example.nhs.uk:9443/v1/fleet/;" in conf
    assert "proxy_ssl_certificate /etc/chc/identity/cert.pem;" in conf
    assert "proxy_ssl_certificate_key /etc/chc/identity/key.pem;" in conf
    assert "proxy_ssl_trusted_certificate /etc/chc/identity/ca.pem;" in conf
    assert "proxy_ssl_name chc-hub.example.nhs.uk;" in conf
    assert "proxy_ssl_verify on;" in conf
    assert "pid /var/lib/chc/nwc.flower/fleet_forward/nginx.pid;" in conf


@pytest.mark.parametrize(
    "bad", ['/srv/a"b', "/srv/a;b", "/srv/a\nb", "/srv/a b", "/srv/$x", "/srv/a{b", "/srv/#a"]
)
@pytest.mark.parametrize("field", ["workdir", "server_cert", "server_key", "ca"])
def test_a_path_that_would_break_the_configuration_is_refused(field: str, bad: str) -> None:
    with pytest.raises(ConfigError, match="cannot go into an nginx configuration"):
        _hub(**{field: Path(bad)})
    with pytest.raises(ConfigError, match="cannot go into an nginx configuration"):
        _node(**{field: Path(bad)})


@pytest.mark.parametrize(
    "changes",
    [
        {"listen": "0.0.0.0:9443; include /etc/passwd"},
        {"listen": "hub"},
        {"listen": "0.0.0.0:70000"},
        {"superlink_port": 0},
        {"superlink_port": True},
        {"superlink_tls_name": "localhost;"},
    ],
)
def test_bad_hub_addresses_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        _hub(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"hub_address": "hub:9443/v1/control/"},
        {"hub_address": "hub:9443\nlocation"},
        {"hub_name": "hub; proxy_ssl_verify off"},
        {"local_port": 65536},
    ],
)
def test_bad_node_values_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        _node(**changes)


def test_temp_paths_of_modules_left_out_of_the_build_are_dropped(tmp_path: Path) -> None:
    fake = tmp_path / "nginx"
    fake.write_text("#!/bin/sh\necho 'configure arguments: --without-http_uwsgi_module' >&2\n")
    fake.chmod(0o755)
    conf = _drop_unbuilt(_hub(), fake)
    assert "uwsgi_temp_path" not in conf
    assert "scgi_temp_path /srv/chc/fleet/tmp/scgi;" in conf


def test_a_node_with_hub_fleet_gets_a_forwarder_to_it(tmp_path: Path) -> None:
    config_file = tmp_path / "node.toml"
    config_file.write_text(
        'name = "nwc"\nomop = "omop"\nidentity = "identity"\n'
        '[learning]\nhub_fleet = "10.1.2.3:9443"\nhub_name = "hub"\n'
    )
    proxy = fleet_forwarder_for(load_config(config_file), config_file)
    assert proxy.workdir == tmp_path / "nwc.flower" / "fleet_forward"
    assert f"listen 127.0.0.1:{proxy.port} ssl;" in proxy.conf
    assert "proxy_pass https://10.1.2.3:9443/v1/fleet/;" in proxy.conf
    assert "proxy_ssl_name hub;" in proxy.conf
    assert f"proxy_ssl_certificate {tmp_path}/identity/cert.pem;" in proxy.conf
    assert f"proxy_ssl_trusted_certificate {tmp_path}/identity/ca.pem;" in proxy.conf


def test_a_missing_nginx_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("protocols.nginx_proxy.shutil.which", lambda *_a, **_k: None)
    with pytest.raises(NginxStartError, match="make system-deps"):
        find_nginx()


def test_a_configuration_nginx_refuses_is_quoted(tmp_path: Path) -> None:
    try:
        find_nginx()
    except NginxStartError:
        pytest.skip("nginx is not installed (make system-deps)")
    proxy = NginxProxy("broken", tmp_path, "events {}\nhttp { no_such_directive on; }\n", 1)
    with pytest.raises(NginxStartError, match="no_such_directive"):
        proxy.start()
    assert not proxy.running()
