"""Base classes of the resources (`ow.files`, `ow.jobs`, …): access to the HTTP core and paging."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from openweights.client._base import AsyncHTTP, SyncHTTP
    from openweights.client._client import AsyncOpenWeights, OpenWeights

T = TypeVar("T")

__all__ = ["AsyncResource", "SyncResource", "next_page_params"]


def next_page_params(
    params: dict[str, Any], *, got: int, limit: int | None, page_max: int, after: Any
) -> dict[str, Any]:
    """Query params for the next page: never ask for more than `limit` in total."""
    size = page_max if limit is None else min(page_max, limit - got)
    return {**params, "limit": size, "after": after}


def _page_done(body: dict[str, Any], got: int, limit: int | None) -> bool:
    return not body.get("has_more") or not body.get("data") or (limit is not None and got >= limit)


class SyncResource:
    def __init__(self, client: OpenWeights) -> None:
        self._client = client

    @property
    def _http(self) -> SyncHTTP:
        return self._client._http

    def _list(
        self,
        path: str,
        *,
        params: dict[str, Any],
        limit: int | None,
        page_max: int,
        parse: Callable[[dict[str, Any]], T],
        cursor: str = "id",
    ) -> list[T]:
        """GET every page of a `Page[...]` route (up to `limit` items; None: all)."""
        out: list[T] = []
        after = None
        while True:
            query = next_page_params(
                params, got=len(out), limit=limit, page_max=page_max, after=after
            )
            body = self._http.request("GET", path, params=query).json()
            data = body.get("data") or []
            out.extend(parse(d) for d in data)
            if _page_done(body, len(out), limit):
                return out
            after = data[-1][cursor]


class AsyncResource:
    def __init__(self, client: AsyncOpenWeights) -> None:
        self._client = client

    @property
    def _http(self) -> AsyncHTTP:
        return self._client._http

    async def _list(
        self,
        path: str,
        *,
        params: dict[str, Any],
        limit: int | None,
        page_max: int,
        parse: Callable[[dict[str, Any]], T],
        cursor: str = "id",
    ) -> list[T]:
        out: list[T] = []
        after = None
        while True:
            query = next_page_params(
                params, got=len(out), limit=limit, page_max=page_max, after=after
            )
            body = (await self._http.request("GET", path, params=query)).json()
            data = body.get("data") or []
            out.extend(parse(d) for d in data)
            if _page_done(body, len(out), limit):
                return out
            after = data[-1][cursor]
