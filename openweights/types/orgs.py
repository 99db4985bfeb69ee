from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

TokenKind = Literal["user", "worker", "run"]


class OrgObject(BaseModel):
    id: str
    object: Literal["organization"] = "organization"
    name: str
    created_at: float


class TokenObject(BaseModel):
    id: str
    object: Literal["token"] = "token"
    name: str
    kind: TokenKind
    prefix: str = Field(description="The first characters of the token, to recognise it.")
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    token: str | None = Field(
        default=None, description="The secret itself: only in create responses."
    )


class TokenCreateParams(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(default="api key", min_length=1, max_length=200)
    kind: Literal["user", "worker"] = "user"
    expires_in_days: float | None = Field(default=None, gt=0, le=3650)


class SignupRequest(BaseModel):
    model_config = {"extra": "forbid"}

    org_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")
    email: str | None = Field(default=None, max_length=320)


class SignupResponse(BaseModel):
    org: OrgObject
    token: TokenObject


class MeResponse(BaseModel):
    org: OrgObject
    token: TokenObject


class SecretObject(BaseModel):
    name: str
    object: Literal["secret"] = "secret"
    updated_at: float


class SecretSet(BaseModel):
    model_config = {"extra": "forbid"}

    value: str = Field(max_length=65_536)


class SecretsImport(BaseModel):
    model_config = {"extra": "forbid"}

    secrets: dict[str, str] = Field(max_length=1000)
