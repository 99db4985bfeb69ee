"""Organizations, API tokens and secrets."""

from __future__ import annotations

import hashlib
import secrets as _secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import Connection, delete, insert, select, update

from openweights.store import schema as s
from openweights.store.crypto import SecretBox
from openweights.store.errors import NotFound, Unauthorized
from openweights.store.queries import query

TOKEN_PREFIX = "ow_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the org, the token and what the token may do."""

    org_id: str
    token_id: str
    kind: str  # user | worker | run
    run_id: int | None = None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def create_org(conn: Connection, name: str, now: float) -> dict:
    org = {"id": new_id("org"), "name": name, "created_at": now}
    conn.execute(insert(s.orgs), org)
    return org


def get_org(conn: Connection, org_id: str) -> dict:
    row = conn.execute(select(s.orgs).where(s.orgs.c.id == org_id)).mappings().first()
    if row is None:
        raise NotFound(f"Organization {org_id!r} not found.")
    return dict(row)


def create_token(
    conn: Connection,
    *,
    org_id: str,
    name: str,
    kind: str,
    now: float,
    expires_at: float | None = None,
    run_id: int | None = None,
) -> tuple[dict, str]:
    """Make a token; return its row and the secret (shown once, stored only as a hash)."""
    secret = TOKEN_PREFIX + _secrets.token_urlsafe(32)
    row = {
        "id": new_id("tok"),
        "org_id": org_id,
        "name": name,
        "kind": kind,
        "token_hash": hash_token(secret),
        "prefix": secret[:10],
        "run_id": run_id,
        "created_at": now,
        "expires_at": expires_at,
        "revoked_at": None,
    }
    conn.execute(query(conn, "insert_token"), row)
    return row, secret


def authenticate(conn: Connection, secret: str, now: float) -> tuple[Principal, float | None]:
    """The caller behind a token, and when the token expires."""
    row = (
        conn.execute(query(conn, "authenticate"), {"token_hash": hash_token(secret)})
        .mappings()
        .first()
    )
    if row is None:
        raise Unauthorized("Invalid API key. Create one with `ow signup` or `ow token create`.")
    if row["revoked_at"] is not None:
        raise Unauthorized(f"API key {row['prefix']}… was revoked.")
    if row["expires_at"] is not None and row["expires_at"] <= now:
        raise Unauthorized(
            f"API key {row['prefix']}… expired. Create a new one with `ow token create`."
        )
    p = Principal(org_id=row["org_id"], token_id=row["id"], kind=row["kind"], run_id=row["run_id"])
    return p, row["expires_at"]


def get_token(conn: Connection, org_id: str, token_id: str) -> dict:
    row = (
        conn.execute(select(s.tokens).where(s.tokens.c.id == token_id, s.tokens.c.org_id == org_id))
        .mappings()
        .first()
    )
    if row is None or row["kind"] == "run":
        raise NotFound(f"Token {token_id!r} not found.")
    return dict(row)


def list_tokens(conn: Connection, org_id: str) -> list[dict]:
    q = (
        select(s.tokens)
        .where(s.tokens.c.org_id == org_id, s.tokens.c.kind != "run")
        .order_by(s.tokens.c.created_at)
    )
    return [dict(r) for r in conn.execute(q).mappings()]


def revoke_token(conn: Connection, org_id: str, token_id: str, now: float) -> dict:
    row = get_token(conn, org_id, token_id)
    if row["revoked_at"] is None:
        conn.execute(update(s.tokens).where(s.tokens.c.id == token_id).values(revoked_at=now))
        row["revoked_at"] = now
    return row


def revoke_run_tokens(conn: Connection, run_id: int, now: float) -> None:
    conn.execute(query(conn, "revoke_run_tokens"), {"run_id": run_id, "now": now})


# -- secrets ---------------------------------------------------------------------------------


def set_secrets(
    conn: Connection, org_id: str, values: dict[str, str], box: SecretBox, now: float
) -> list[dict]:
    out = []
    for name, value in values.items():
        enc = box.encrypt(value)
        exists = conn.execute(
            select(s.secrets.c.name).where(s.secrets.c.org_id == org_id, s.secrets.c.name == name)
        ).first()
        if exists:
            conn.execute(
                update(s.secrets)
                .where(s.secrets.c.org_id == org_id, s.secrets.c.name == name)
                .values(value_encrypted=enc, updated_at=now)
            )
        else:
            conn.execute(
                insert(s.secrets).values(
                    org_id=org_id, name=name, value_encrypted=enc, updated_at=now
                )
            )
        out.append({"name": name, "updated_at": now})
    return out


def list_secrets(conn: Connection, org_id: str) -> list[dict]:
    q = (
        select(s.secrets.c.name, s.secrets.c.updated_at)
        .where(s.secrets.c.org_id == org_id)
        .order_by(s.secrets.c.name)
    )
    return [dict(r) for r in conn.execute(q).mappings()]


def delete_secret(conn: Connection, org_id: str, name: str) -> dict:
    row = (
        conn.execute(
            select(s.secrets.c.name, s.secrets.c.updated_at).where(
                s.secrets.c.org_id == org_id, s.secrets.c.name == name
            )
        )
        .mappings()
        .first()
    )
    if row is None:
        raise NotFound(f"Secret {name!r} not found.", param="name")
    conn.execute(delete(s.secrets).where(s.secrets.c.org_id == org_id, s.secrets.c.name == name))
    return dict(row)


def secret_env(conn: Connection, org_id: str, box: SecretBox) -> dict[str, str]:
    rows = conn.execute(query(conn, "secret_env"), {"org_id": org_id}).all()
    return {name: box.decrypt(enc) for name, enc in rows}
