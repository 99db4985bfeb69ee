"""`ow.tokens`: API tokens of the organization (create, list, revoke)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError

from openweights.client._errors import format_validation_error
from openweights.client._models import Token
from openweights.client._resource import AsyncResource, SyncResource
from openweights.types import TokenCreateParams

__all__ = ["AsyncTokens", "Tokens"]


def _create_body(name: str, kind: str, expires_in_days: float | None) -> dict[str, Any]:
    try:
        params = TokenCreateParams(name=name, kind=kind, expires_in_days=expires_in_days)
    except ValidationError as e:
        raise format_validation_error("the token", e) from None
    return params.model_dump(mode="json", exclude_none=True)


def _parse(body: dict[str, Any]) -> Token:
    return Token.model_validate(body)


class Tokens(SyncResource):
    """`ow.tokens`."""

    def create(
        self,
        *,
        name: str = "api key",
        kind: Literal["user", "worker"] = "user",
        expires_in_days: float | None = None,
    ) -> Token:
        """A new token; its secret (`token.token`) is shown only now."""
        body = _create_body(name, kind, expires_in_days)
        return _parse(self._http.request("POST", "/v1/tokens", json=body).json())

    def list(self) -> list[Token]:
        body = self._http.request("GET", "/v1/tokens").json()
        return [_parse(d) for d in body.get("data") or []]

    def revoke(self, token_id: str) -> Token:
        return _parse(self._http.request("DELETE", f"/v1/tokens/{token_id}").json())


class AsyncTokens(AsyncResource):
    """`ow.tokens` of `AsyncOpenWeights`."""

    async def create(
        self,
        *,
        name: str = "api key",
        kind: Literal["user", "worker"] = "user",
        expires_in_days: float | None = None,
    ) -> Token:
        """A new token; its secret (`token.token`) is shown only now."""
        body = _create_body(name, kind, expires_in_days)
        return _parse((await self._http.request("POST", "/v1/tokens", json=body)).json())

    async def list(self) -> list[Token]:
        body = (await self._http.request("GET", "/v1/tokens")).json()
        return [_parse(d) for d in body.get("data") or []]

    async def revoke(self, token_id: str) -> Token:
        return _parse((await self._http.request("DELETE", f"/v1/tokens/{token_id}")).json())
