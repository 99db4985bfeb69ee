"""Bearer-token authentication and what each kind of token may do.

Verified tokens are cached for a few seconds so that a request pays no extra database trip;
a revocation drops the entry once it commits, on this server and, through LISTEN/NOTIFY, on the
others (`auth:` keys), so a revoked token fails on its next request.
"""

from __future__ import annotations

import time

from fastapi import Request

from openweights.store import orgs
from openweights.store.errors import Forbidden, Unauthorized
from openweights.store.orgs import Principal

CACHE_TTL_S = 10.0
CACHE_MAX = 10_000


class AuthCache:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[Principal, float | None, float]] = {}
        # Bumped by every drop: a look-up that read the token before a revocation committed
        # must not cache it after the drop (`put` compares generations).
        self.generation = 0

    def get(self, token_hash: str, now: float) -> Principal | None:
        hit = self._entries.get(token_hash)
        if hit is None:
            return None
        principal, expires_at, cached_at = hit
        if now - cached_at > CACHE_TTL_S or (expires_at is not None and expires_at <= time.time()):
            self._entries.pop(token_hash, None)
            return None
        return principal

    def put(
        self,
        token_hash: str,
        principal: Principal,
        expires_at: float | None,
        now: float,
        generation: int | None = None,
    ) -> None:
        """Cache a verified token, unless something was dropped since `generation` was read."""
        if generation is not None and generation != self.generation:
            return
        if len(self._entries) >= CACHE_MAX:
            self._entries.clear()
        self._entries[token_hash] = (principal, expires_at, now)

    def drop(self, key: str) -> None:
        """`auth:token:<id>`, `auth:run:<id>` or anything else under `auth:` (drop all)."""
        self.generation += 1
        kind, _, ident = key.removeprefix("auth:").partition(":")
        if kind == "token":
            victims = [h for h, (p, _, _) in self._entries.items() if p.token_id == ident]
        elif kind == "run":
            victims = [h for h, (p, _, _) in self._entries.items() if str(p.run_id) == ident]
        else:
            victims = list(self._entries)
        for h in victims:
            self._entries.pop(h, None)


async def principal(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise Unauthorized(
            "Missing API key: send `Authorization: Bearer ow_…` (set OPENWEIGHTS_API_KEY; "
            "get a key with `ow signup` or `ow token create`)."
        )
    state = request.app.state.ow
    token_hash = orgs.hash_token(secret)
    now = time.monotonic()
    cached = state.auth_cache.get(token_hash, now)
    if cached is not None:
        return cached
    generation = state.auth_cache.generation

    def check():
        with state.db.read() as conn:
            return orgs.authenticate(conn, secret, state.db.now(conn))

    p, expires_at = await state.call(check)
    state.auth_cache.put(token_hash, p, expires_at, now, generation)
    return p


def require(p: Principal, *kinds: str) -> None:
    if p.kind not in kinds:
        raise Forbidden(f"A {p.kind} token may not do this; use a user API key.")
