"""Sign-up, the caller's identity, API tokens and org secrets."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request

from openweights import types as t
from openweights.server import convert
from openweights.server.auth import principal, require
from openweights.server.env_cache import secrets_key
from openweights.server.routes._errors import ERROR_RESPONSES
from openweights.store import orgs
from openweights.store.errors import Forbidden, Invalid
from openweights.store.orgs import Principal
from openweights.types.orgs import SECRET_NAME_PATTERN

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
SecretPath = Annotated[
    str, Path(pattern=SECRET_NAME_PATTERN, description="An environment variable name.")
]


@router.post("/signup", response_model=t.SignupResponse, tags=["orgs"])
async def signup(body: t.SignupRequest, request: Request) -> t.SignupResponse:
    """Create an organization and its first (admin) API key."""
    state = request.app.state.ow
    if not state.settings.allow_signup:
        raise Forbidden("Sign-up is disabled on this server; ask its operator for an API key.")

    def work():
        with state.db.write() as conn:
            now = state.db.now(conn)
            org = orgs.create_org(conn, body.org_name, now)
            row, secret = orgs.create_token(
                conn, org_id=org["id"], name="admin", kind="user", now=now
            )
            return org, row, secret

    org, row, secret = await state.call(work)
    return t.SignupResponse(org=t.OrgObject(**org), token=convert.token(row, secret))


@router.get("/me", response_model=t.MeResponse, tags=["orgs"])
async def me(request: Request, p: Principal = Depends(principal)) -> t.MeResponse:
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            org = orgs.get_org(conn, p.org_id)
            from sqlalchemy import select

            from openweights.store import schema as s

            tok = conn.execute(select(s.tokens).where(s.tokens.c.id == p.token_id)).mappings().one()
            return org, dict(tok)

    org, tok = await state.call(work)
    return t.MeResponse(org=t.OrgObject(**org), token=convert.token(tok))


@router.post("/tokens", response_model=t.TokenObject, tags=["tokens"])
async def create_token(
    body: t.TokenCreateParams, request: Request, p: Principal = Depends(principal)
) -> t.TokenObject:
    require(p, "user")
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            now = state.db.now(conn)
            expires = now + body.expires_in_days * 86400 if body.expires_in_days else None
            return orgs.create_token(
                conn, org_id=p.org_id, name=body.name, kind=body.kind, now=now, expires_at=expires
            )

    row, secret = await state.call(work)
    return convert.token(row, secret)


@router.get("/tokens", response_model=t.Page[t.TokenObject], tags=["tokens"])
async def list_tokens(request: Request, p: Principal = Depends(principal)) -> t.Page[t.TokenObject]:
    require(p, "user")
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return orgs.list_tokens(conn, p.org_id)

    return t.Page[t.TokenObject](data=[convert.token(r) for r in await state.call(work)])


@router.delete("/tokens/{token_id}", response_model=t.TokenObject, tags=["tokens"])
async def revoke_token(
    token_id: str, request: Request, p: Principal = Depends(principal)
) -> t.TokenObject:
    require(p, "user")
    state = request.app.state.ow

    key = f"auth:token:{token_id}"

    def work():
        with state.db.write() as conn:
            row = orgs.revoke_token(conn, p.org_id, token_id, state.db.now(conn))
            state.publish(conn, key)
        state.committed(key)  # drop the cached token now
        return row

    return convert.token(await state.call(work))


@router.get("/secrets", response_model=t.Page[t.SecretObject], tags=["secrets"])
async def list_secrets(
    request: Request, p: Principal = Depends(principal)
) -> t.Page[t.SecretObject]:
    require(p, "user")
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return orgs.list_secrets(conn, p.org_id)

    return t.Page[t.SecretObject](data=[t.SecretObject(**r) for r in await state.call(work)])


def _check_name(name: str) -> None:
    import re

    if not re.match(SECRET_NAME_PATTERN, name):
        raise Invalid(
            f"Secret name {name[:80]!r} is not a valid environment variable name (letters, digits, _).",
            param="name",
        )


async def _set(request: Request, p: Principal, values: dict[str, str]) -> list[dict]:
    require(p, "user")
    for name in values:
        _check_name(name)
    state = request.app.state.ow
    key = secrets_key(p.org_id)

    def work():
        with state.db.write() as conn:
            rows = orgs.set_secrets(conn, p.org_id, values, state.box, state.db.now(conn))
            state.publish(conn, key)
        state.committed(key)  # the next claim reads the new secrets
        return rows

    return await state.call(work)


@router.put("/secrets/{name}", response_model=t.SecretObject, tags=["secrets"])
async def set_secret(
    name: SecretPath, body: t.SecretSet, request: Request, p: Principal = Depends(principal)
) -> t.SecretObject:
    return t.SecretObject(**(await _set(request, p, {name: body.value}))[0])


@router.post("/secrets", response_model=t.Page[t.SecretObject], tags=["secrets"])
async def import_secrets(
    body: t.SecretsImport, request: Request, p: Principal = Depends(principal)
) -> t.Page[t.SecretObject]:
    rows = await _set(request, p, body.secrets)
    return t.Page[t.SecretObject](data=[t.SecretObject(**r) for r in rows])


@router.delete("/secrets/{name}", response_model=t.SecretObject, tags=["secrets"])
async def delete_secret(
    name: SecretPath, request: Request, p: Principal = Depends(principal)
) -> t.SecretObject:
    require(p, "user")
    state = request.app.state.ow
    key = secrets_key(p.org_id)

    def work():
        with state.db.write() as conn:
            row = orgs.delete_secret(conn, p.org_id, name)
            state.publish(conn, key)
        state.committed(key)  # the next claim no longer gets it
        return row

    return t.SecretObject(**(await state.call(work)))
