from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

TokenKind = Literal["user", "worker", "run"]
#: Org secrets become environment variables of jobs.
SECRET_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,199}$"
SecretName = Annotated[str, StringConstraints(pattern=SECRET_NAME_PATTERN)]


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
    model_config = {"extra": "forbid", "strict": True}

    name: str = Field(default="api key", min_length=1, max_length=200)
    kind: Literal["user", "worker"] = "user"
    expires_in_days: float | None = Field(default=None, gt=0, le=3650)


class SignupRequest(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

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
    model_config = {"extra": "forbid", "strict": True}

    value: str = Field(max_length=65_536)


class SecretsImport(BaseModel):
    model_config = {"extra": "forbid", "strict": True}

    secrets: dict[SecretName, str] = Field(max_length=1000)
