"""`chc ui`'s door: no page without the token; the token is traded once for a strict cookie;
forms only from the dashboard's own pages; only at its own loopback Host."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from coordinator.ui.auth import new_token, token_ok
from tests.unit._ui_helpers import TOKEN, browser, serving, ui_config


def _cookie(base: str) -> str:
    """The session cookie of the dashboard at base: named by its port, as Jupyter's are."""
    return f"chc_ui_token_{base.rsplit(':', 1)[1]}"


PAGES = ("/", "/query", "/history", "/audit", "/fragments/nodes", "/history/1", "/history/1.csv")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(ui_config(tmp_path_factory.mktemp("ui"))) as url:
        yield url


def test_every_page_refuses_without_the_token(base: str) -> None:
    with browser(base, signed_in=False) as c:
        for path in PAGES:
            response = c.get(path)
            assert response.status_code == 403, path
            assert "chc ui" in response.text
            assert "?token=" in response.text
            assert TOKEN not in response.text


def test_a_wrong_token_or_cookie_is_refused(base: str) -> None:
    with browser(base, signed_in=False) as c:
        assert c.get("/history?token=" + TOKEN[:-1] + "y").status_code == 403
        assert c.get("/history?token=").status_code == 403
        c.cookies.set(_cookie(base), TOKEN + "z")
        assert c.get("/history").status_code == 403


def test_another_ports_cookie_is_not_this_dashboards(base: str) -> None:
    port = int(base.rsplit(":", 1)[1])
    with browser(base, signed_in=False) as c:
        # The right token under another instance's name (or the old unnamed one) is refused:
        # each `chc ui` reads only its own cookie, so two never sign each other out.
        c.cookies.set(f"chc_ui_token_{port + 1}", TOKEN)
        c.cookies.set("chc_ui_token", TOKEN)
        assert c.get("/history").status_code == 403


def test_the_token_is_traded_for_a_strict_cookie_and_leaves_the_url(base: str) -> None:
    with browser(base, signed_in=False) as c:
        response = c.get(f"/history?entry=3&token={TOKEN}")
        assert response.status_code == 303
        assert response.headers["location"] == "/history?entry=3"
        cookie = response.headers["set-cookie"]
        assert cookie.startswith(f"{_cookie(base)}={TOKEN};")
        assert "httponly" in cookie.lower()
        assert "samesite=strict" in cookie.lower()
        assert "max-age" not in cookie.lower()  # a session cookie
        page = c.get("/history")
        assert page.status_code == 200
        assert 'id="history"' in page.text


def test_static_assets_are_public_and_pages_carry_a_strict_policy(base: str) -> None:
    with browser(base, signed_in=False) as c:
        assert c.get("/static/chc.css").status_code == 200
        assert c.get("/static/chc.js").status_code == 200
    with browser(base) as c:
        page = c.get("/history")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "default-src 'self'" in policy
    assert page.headers["referrer-policy"] == "same-origin"
    assert page.headers["cache-control"] == "no-store"


def test_only_the_loopback_host_of_its_port_is_answered(base: str) -> None:
    port = int(base.rsplit(":", 1)[1])
    with browser(base) as c:
        # DNS rebinding: a page at evil.example that resolves to 127.0.0.1 sends its own Host.
        assert c.get("/history", headers={"host": f"evil.example:{port}"}).status_code == 403
        assert c.get("/history", headers={"host": f"127.0.0.1:{port + 1}"}).status_code == 403
        assert c.get("/history", headers={"host": f"localhost:{port}"}).status_code == 200


def test_a_post_needs_the_cookie_and_the_dashboards_own_origin(base: str) -> None:
    form = {"sql": "SELECT COUNT(*) FROM persons", "rho": "0.1", "action": "run"}
    with browser(base, signed_in=False) as c:
        # The token in the URL does not stand in for the cookie on a POST.
        refused = c.post(f"/query?token={TOKEN}", data=form, headers={"origin": base})
        assert refused.status_code == 403
    with browser(base) as c:
        for headers in (
            {"origin": "http://evil.example"},
            {"origin": "null"},
            {"referer": "http://evil.example/page"},
            {},  # neither Origin nor Referer
        ):
            assert c.post("/query", data=form, headers=headers).status_code == 403, headers


def test_tokens_are_long_random_and_compared_exactly() -> None:
    a, b = new_token(), new_token()
    assert a != b
    assert len(a) >= 43
    assert token_ok(a, a)
    assert not token_ok(b, a)
    assert not token_ok(None, a)
    assert not token_ok(a[:-1], a)
