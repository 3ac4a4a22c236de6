"""The dashboard's door: a random token, traded once for a cookie, and Host/Origin checks.

The app listens on loopback, but any local process and any web page the user opens can send
requests there. So, as Jupyter does, every request needs a secret: the URL printed by
`chc ui` carries it once (`?token=`), the app trades it for an HttpOnly, SameSite=Strict
cookie and redirects to the same URL without it (so it stays out of history and Referer).
SameSite=Strict keeps other sites' forms from riding the cookie (CSRF); the Origin check on
POSTs and the Host check on every request (DNS rebinding) are a second fence.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

# The session cookie's name is this and the port (chc_ui_token_8765), as Jupyter names its
# cookies: cookies are per host, not per port, so two `chc ui` on one machine would otherwise
# overwrite each other's and sign each other out.
COOKIE_PREFIX = "chc_ui_token_"
TOKEN_PARAM = "token"  # noqa: S105 (the name of the URL parameter, not a secret)
# Served to anyone: the stylesheet and the refresh script hold nothing secret.
PUBLIC_PREFIX = "/static/"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_REFUSED_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>chc ui: not signed in</title>
<link rel="stylesheet" href="/static/chc.css"></head>
<body><main id="main"><h1>Not signed in</h1>
<p id="refused">{reason} Open the address that <code>chc ui</code> printed when it started
(it ends in <code>?token=...</code>) in this browser.</p></main></body></html>
"""


def new_token() -> str:
    """A fresh token: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def cookie_name(port: int) -> str:
    """The session cookie of the dashboard listening on `port`."""
    return f"{COOKIE_PREFIX}{port}"


def token_ok(given: str | None, token: str) -> bool:
    """Whether a presented token is the right one (in constant time)."""
    return given is not None and secrets.compare_digest(given.encode(), token.encode())


@dataclass
class Guard:
    """Who may talk to the app: the holder of `token`, at a loopback Host of `port`.

    port is set once the server is bound (it may have asked for any free port); hosts names
    the loopback names the browser may use for it.
    """

    token: str
    port: int = 0
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
    extra_origins: set[str] = field(default_factory=set)

    @property
    def cookie(self) -> str:
        """This server's session cookie name (per port)."""
        return cookie_name(self.port)

    def allowed_hosts(self) -> set[str]:
        """Host header values that name this server."""
        return {f"{h}:{self.port}" for h in self.hosts}

    def allowed_origins(self) -> set[str]:
        """Origins from which a form may be posted: this server's own."""
        return {f"http://{h}" for h in self.allowed_hosts()} | self.extra_origins

    def refusal(self, request: Request) -> str | None:
        """Why a request is refused, or None if it may go on."""
        if request.headers.get("host", "") not in self.allowed_hosts():
            return "This server answers only at its own loopback address."
        if request.method not in _SAFE_METHODS:
            origin = request.headers.get("origin") or _origin_of(request.headers.get("referer"))
            if origin not in self.allowed_origins():
                return "A form may be sent only from this dashboard's own pages."
            if not token_ok(request.cookies.get(self.cookie), self.token):
                return "This request carries no valid session cookie."
            return None
        if token_ok(request.cookies.get(self.cookie), self.token):
            return None
        if TOKEN_PARAM in request.query_params:
            return "That token is not this server's."
        return "This dashboard needs its token."

    async def __call__(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Starlette HTTP middleware: trade a right token for the cookie, refuse the rest."""
        if request.url.path.startswith(PUBLIC_PREFIX) and request.method in _SAFE_METHODS:
            return await call_next(request)
        given = request.query_params.get(TOKEN_PARAM)
        host_ok = request.headers.get("host", "") in self.allowed_hosts()
        if request.method in _SAFE_METHODS and host_ok and token_ok(given, self.token):
            return _trade_for_cookie(request, self.token, self.cookie)
        reason = self.refusal(request)
        if reason is not None:
            return HTMLResponse(_REFUSED_PAGE.format(reason=reason), status_code=403)
        return await call_next(request)


def _origin_of(url: str | None) -> str | None:
    """scheme://host:port of a URL (a Referer), or None."""
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def _without(params: Iterable[tuple[str, str]], name: str) -> str:
    return urlencode([(k, v) for k, v in params if k != name])


def _trade_for_cookie(request: Request, token: str, cookie: str) -> Response:
    """303 to the same path and query without the token, setting the session cookie."""
    query = _without(request.query_params.multi_items(), TOKEN_PARAM)
    target = request.url.path + (f"?{query}" if query else "")
    response = RedirectResponse(target, status_code=303)
    # No Max-Age: a session cookie, gone when the browser closes; the server's token dies
    # with the server anyway. Not Secure: the app speaks plain HTTP on loopback.
    response.set_cookie(cookie, token, httponly=True, samesite="strict", path="/")
    return response
