"""Bearer-token authentication and what each kind of token may do."""

from __future__ import annotations

from fastapi import Request

from openweights.store import orgs
from openweights.store.errors import Forbidden, Unauthorized
from openweights.store.orgs import Principal


async def principal(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized(
            "Missing API key: send `Authorization: Bearer ow_…` (set OPENWEIGHTS_API_KEY; "
            "get a key with `ow signup` or `ow token create`)."
        )
    state = request.app.state.ow

    def check():
        with state.db.read() as conn:
            return orgs.authenticate(conn, secret.strip(), state.db.now(conn))

    return await state.call(check)


def require(p: Principal, *kinds: str) -> None:
    if p.kind not in kinds:
        raise Forbidden(f"A {p.kind} token may not do this; use a user API key.")
