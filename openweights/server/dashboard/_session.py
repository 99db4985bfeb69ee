"""Dashboard sessions: an httpOnly cookie holding a short-lived API token of the user's org.

Logging in with an API key (or signing up) mints a new user token named `dashboard session` that
expires after `SESSION_TTL_S`; the cookie carries that token, never the key typed in. So a session
is authenticated, expires and is revoked exactly like any API key (and shows in the token list),
and logout revokes it. The CSRF token is an HMAC of the session token: a page gets it in a
`<meta>` tag, and every state-changing request must send it back (form field `csrf` or header
`X-CSRF-Token`); a cross-site page can neither read the cookie nor the page, so it cannot forge it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request

from openweights.store import orgs
from openweights.store.errors import Unauthorized
from openweights.store.orgs import Principal

COOKIE = "ow_session"
SESSION_TOKEN_NAME = "dashboard session"
SESSION_TTL_S = 12 * 3600.0


class LoginRequired(Exception):
    """No valid session: the page redirects to the login page."""

    def __init__(self, next_url: str = "", reason: str = "") -> None:
        super().__init__(reason)
        self.next_url = next_url
        self.reason = reason


class CSRFError(Exception):
    """A state-changing request without the session's CSRF token (or from another origin)."""


@dataclass(frozen=True)
class Session:
    principal: Principal
    org_id: str
    org_name: str
    csrf: str
    expires_at: float | None


def csrf_for(secret: str) -> str:
    return hmac.new(secret.encode(), b"openweights-dashboard-csrf", hashlib.sha256).hexdigest()


async def current(request: Request) -> Session:
    """The request's session, or LoginRequired."""
    secret = request.cookies.get(COOKIE, "")
    next_url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if not secret:
        raise LoginRequired(next_url)
    state = request.app.state.ow
    token_hash = orgs.hash_token(secret)
    now = time.monotonic()
    cached = state.auth_cache.get(token_hash, now)
    expires_at = None

    def check():
        with state.db.read() as conn:
            p, exp = (
                (cached, None)
                if cached is not None
                else orgs.authenticate(conn, secret, state.db.now(conn))
            )
            return p, exp, orgs.get_org(conn, p.org_id)["name"]

    generation = state.auth_cache.generation
    try:
        p, expires_at, org_name = await state.call(check)
    except Unauthorized as e:
        raise LoginRequired(next_url, "Your session ended; log in again.") from e
    if cached is None:
        state.auth_cache.put(token_hash, p, expires_at, now, generation)
    if p.kind != "user":
        raise LoginRequired(next_url, "Log in with a user API key.")
    return Session(
        principal=p,
        org_id=p.org_id,
        org_name=org_name,
        csrf=csrf_for(secret),
        expires_at=expires_at,
    )


async def check_csrf(request: Request, session: Session) -> None:
    """Refuse a state-changing request without the CSRF token, or from another origin."""
    check_origin(request)
    sent = request.headers.get("x-csrf-token")
    if not sent:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get("csrf")
            sent = value if isinstance(value, str) else None
    if not sent or not hmac.compare_digest(sent, session.csrf):
        raise CSRFError("Missing or wrong CSRF token: reload the page and try again.")


def check_origin(request: Request) -> None:
    """A browser names the page a POST comes from; it must be this server."""
    origin = request.headers.get("origin")
    if origin and origin != "null":
        if urlsplit(origin).netloc != request.headers.get("host", ""):
            raise CSRFError(f"Request from another origin ({origin}) refused.")
