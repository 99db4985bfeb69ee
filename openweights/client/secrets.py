"""`ow.secrets`: organization secrets (env vars passed to the org's jobs). Values never come back."""

from __future__ import annotations

import builtins
from typing import Any
from urllib.parse import quote

from openweights.client._models import Secret
from openweights.client._resource import AsyncResource, SyncResource

__all__ = ["AsyncSecrets", "Secrets"]


def _path(name: str) -> str:
    return f"/v1/secrets/{quote(name, safe='')}"


def _import_body(secrets: dict[str, str]) -> dict[str, Any]:
    return {"secrets": {str(k): str(v) for k, v in secrets.items()}}


def _parse(body: dict[str, Any]) -> Secret:
    return Secret.model_validate(body)


def _parse_page(body: dict[str, Any]) -> list[Secret]:
    return [_parse(d) for d in body.get("data") or []]


class Secrets(SyncResource):
    """`ow.secrets`."""

    def list(self) -> list[Secret]:
        """Names (and update times) of the organization's secrets."""
        return _parse_page(self._http.request("GET", "/v1/secrets").json())

    def set(self, name: str, value: str) -> Secret:
        return _parse(self._http.request("PUT", _path(name), json={"value": value}).json())

    def import_env(self, secrets: dict[str, str]) -> builtins.list[Secret]:
        """Set many secrets at once (e.g. the parsed lines of a `.env` file)."""
        body = _import_body(secrets)
        return _parse_page(self._http.request("POST", "/v1/secrets", json=body, retry=True).json())

    def unset(self, name: str) -> Secret:
        return _parse(self._http.request("DELETE", _path(name)).json())


class AsyncSecrets(AsyncResource):
    """`ow.secrets` of `AsyncOpenWeights`."""

    async def list(self) -> list[Secret]:
        """Names (and update times) of the organization's secrets."""
        return _parse_page((await self._http.request("GET", "/v1/secrets")).json())

    async def set(self, name: str, value: str) -> Secret:
        response = await self._http.request("PUT", _path(name), json={"value": value})
        return _parse(response.json())

    async def import_env(self, secrets: dict[str, str]) -> builtins.list[Secret]:
        """Set many secrets at once (e.g. the parsed lines of a `.env` file)."""
        response = await self._http.request(
            "POST", "/v1/secrets", json=_import_body(secrets), retry=True
        )
        return _parse_page(response.json())

    async def unset(self, name: str) -> Secret:
        return _parse((await self._http.request("DELETE", _path(name))).json())
