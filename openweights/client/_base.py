"""The one HTTP core of the SDK, the CLI and the worker.

`BaseHTTP` builds requests, maps errors and decides retries without doing I/O;
`SyncHTTP` and `AsyncHTTP` only send. Everything that talks to an openweights
server goes through one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from openweights._exceptions import (
    APIConnectionError,
    APITimeoutError,
    make_status_error,
)

__all__ = ["DEFAULT_TIMEOUT_S", "AsyncHTTP", "BaseHTTP", "SyncHTTP"]

DEFAULT_TIMEOUT_S = 60.0
#: Methods safe to resend after a connection error or a 5xx/429.
_IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}
_RETRY_STATUS = {408, 429, 502, 503, 504}


class BaseHTTP:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        max_retries: int = 3,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_retries = max_retries
        self.timeout_s = timeout_s

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": "openweights-python"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _should_retry(
        self, method: str, attempt: int, *, status: int | None, retry: bool | None
    ) -> bool:
        if attempt >= self.max_retries:
            return False
        allowed = retry if retry is not None else method.upper() in _IDEMPOTENT
        if not allowed:
            return False
        return status is None or status in _RETRY_STATUS

    @staticmethod
    def _retry_delay_s(attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            after = response.headers.get("retry-after")
            if after:
                try:
                    return min(float(after), 30.0)
                except ValueError:
                    pass
        return min(0.25 * 2**attempt, 8.0) * (0.5 + random.random() / 2)

    @staticmethod
    def _timeout(timeout_s: float | None, default: float) -> httpx.Timeout:
        t = default if timeout_s is None else timeout_s
        if math.isinf(t):
            # live streams (`follow=true` logs) may stay silent for minutes: no read timeout
            return httpx.Timeout(None, connect=10.0)
        return httpx.Timeout(t, connect=min(t, 10.0))

    @staticmethod
    def _content(content: Any) -> Any:
        # A callable gives fresh content per attempt, so streamed bodies can be retried.
        return content() if callable(content) else content


class SyncHTTP(BaseHTTP):
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        transport: httpx.BaseTransport | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, api_key, **kwargs)
        # `transport`: tests swap in `httpx.MockTransport` instead of patching.
        self._client = httpx.Client(
            base_url=self.base_url, headers=self._headers(), transport=transport
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        content: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
        retry: bool | None = None,
    ) -> httpx.Response:
        """Send a request; raise the typed error for a 4xx/5xx; retry what is safe to retry.

        `content` may be a callable returning the body, called once per attempt, so that a
        streamed body (a generator reading a file) can be sent again on retry.
        """
        attempt = 0
        while True:
            try:
                response = self._client.request(
                    method,
                    path,
                    json=json,
                    params=_clean(params),
                    content=self._content(content),
                    headers=headers,
                    timeout=self._timeout(timeout_s, self.timeout_s),
                )
            except httpx.TimeoutException as e:
                if self._should_retry(method, attempt, status=None, retry=retry):
                    time.sleep(self._retry_delay_s(attempt, None))
                    attempt += 1
                    continue
                raise APITimeoutError(request=e.request) from e
            except httpx.TransportError as e:
                if self._should_retry(method, attempt, status=None, retry=retry):
                    time.sleep(self._retry_delay_s(attempt, None))
                    attempt += 1
                    continue
                raise APIConnectionError(
                    f"Could not connect to the openweights server at {self.base_url}: {e}",
                    request=getattr(e, "request", None),
                ) from e
            if response.status_code >= 400:
                if self._should_retry(method, attempt, status=response.status_code, retry=retry):
                    time.sleep(self._retry_delay_s(attempt, response))
                    attempt += 1
                    continue
                raise make_status_error(response)
            return response

    @contextlib.contextmanager
    def stream_response(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[httpx.Response]:
        """Open a streamed response (status checked, errors typed); read it inside the block."""
        try:
            with self._client.stream(
                method,
                path,
                params=_clean(params),
                headers=headers,
                timeout=self._timeout(timeout_s, self.timeout_s),
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise make_status_error(response)
                yield response
        except httpx.TimeoutException as e:
            raise APITimeoutError(request=e.request) from e
        except httpx.TransportError as e:
            raise APIConnectionError(
                f"Connection to the openweights server at {self.base_url} failed: {e}"
            ) from e

    def stream(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        chunk_size: int = 1 << 20,
    ) -> Iterator[bytes]:
        """Stream a response body in chunks (downloads, live logs)."""
        with self.stream_response(method, path, params=params, timeout_s=timeout_s) as response:
            yield from response.iter_bytes(chunk_size)

    @property
    def closed(self) -> bool:
        """Whether `close()` was called (background threads stop then)."""
        return self._client.is_closed

    def close(self) -> None:
        self._client.close()


class AsyncHTTP(BaseHTTP):
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, api_key, **kwargs)
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers(), transport=transport
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        content: Any = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
        retry: bool | None = None,
    ) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._client.request(
                    method,
                    path,
                    json=json,
                    params=_clean(params),
                    content=self._content(content),
                    headers=headers,
                    timeout=self._timeout(timeout_s, self.timeout_s),
                )
            except httpx.TimeoutException as e:
                if self._should_retry(method, attempt, status=None, retry=retry):
                    await asyncio.sleep(self._retry_delay_s(attempt, None))
                    attempt += 1
                    continue
                raise APITimeoutError(request=e.request) from e
            except httpx.TransportError as e:
                if self._should_retry(method, attempt, status=None, retry=retry):
                    await asyncio.sleep(self._retry_delay_s(attempt, None))
                    attempt += 1
                    continue
                raise APIConnectionError(
                    f"Could not connect to the openweights server at {self.base_url}: {e}",
                    request=getattr(e, "request", None),
                ) from e
            if response.status_code >= 400:
                if self._should_retry(method, attempt, status=response.status_code, retry=retry):
                    await asyncio.sleep(self._retry_delay_s(attempt, response))
                    attempt += 1
                    continue
                raise make_status_error(response)
            return response

    @contextlib.asynccontextmanager
    async def stream_response(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Open a streamed response (status checked, errors typed); read it inside the block."""
        try:
            async with self._client.stream(
                method,
                path,
                params=_clean(params),
                headers=headers,
                timeout=self._timeout(timeout_s, self.timeout_s),
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise make_status_error(response)
                yield response
        except httpx.TimeoutException as e:
            raise APITimeoutError(request=e.request) from e
        except httpx.TransportError as e:
            raise APIConnectionError(
                f"Connection to the openweights server at {self.base_url} failed: {e}"
            ) from e

    async def stream(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        chunk_size: int = 1 << 20,
    ) -> AsyncIterator[bytes]:
        async with self.stream_response(
            method, path, params=params, timeout_s=timeout_s
        ) as response:
            async for chunk in response.aiter_bytes(chunk_size):
                yield chunk

    async def close(self) -> None:
        await self._client.aclose()


def _clean(params: dict[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    return {k: v for k, v in params.items() if v is not None}
