"""`ow.chat.completions.create(...)`: OpenAI chat completions through the openweights server.

Requests go to the server's `/v1/chat/completions`, which forwards them to the deployment serving
`model`. A model with no deployment is deployed first (`ow.api.multi_deploy`), as in the
original: models first requested within `batch_window_s` of each other are deployed together,
so LoRA adapters of one base share one server. Such deployments stop after their idle timeout.

```python
c = ow.chat.completions.create(model="unsloth/Qwen3-4B", messages=[{"role": "user", "content": "hi"}])
c.choices[0].message.content
for chunk in ow.chat.completions.create(model=..., messages=..., stream=True):
    print(chunk.choices[0].delta.content or "", end="")
```
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from pydantic import BaseModel, ConfigDict

from openweights._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    NotFoundError,
    OpenWeightsError,
    make_status_error,
)

if TYPE_CHECKING:
    from openweights.client._client import AsyncOpenWeights, OpenWeights

__all__ = [
    "AsyncChat",
    "AsyncStream",
    "Chat",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Stream",
]

#: Default seconds one completion may take (a deployment's first answer included).
TIMEOUT_S = 600.0
PATH = "/v1/chat/completions"


class _Obj(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatCompletionMessage(_Obj):
    role: str = "assistant"
    content: str | None = None


class Choice(_Obj):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: str | None = None


class CompletionUsage(_Obj):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletion(_Obj):
    """OpenAI's `chat.completion` object."""

    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str
    choices: list[Choice]
    usage: CompletionUsage | None = None


class ChoiceDelta(_Obj):
    role: str | None = None
    content: str | None = None


class ChunkChoice(_Obj):
    index: int = 0
    delta: ChoiceDelta
    finish_reason: str | None = None


class ChatCompletionChunk(_Obj):
    """OpenAI's `chat.completion.chunk` object (one SSE event of a stream)."""

    id: str
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


#: Models `ow.chat` sends to OpenAI itself, as the original did: `openai/<name>`, and bare OpenAI
#: names (`gpt-4o-mini`, `o3`, `o1-mini`, `chatgpt-4o-latest`).
_OPENAI_NAME = re.compile(r"^(openai/.+|gpt-.+|chatgpt-.+|o[1-9](-.*)?)$")


def is_openai_model(model: str) -> bool:
    """Whether `ow.chat.completions.create(model=...)` goes to OpenAI's API, not a deployment."""
    return bool(_OPENAI_NAME.match(model))


def _openai(async_: bool) -> Any:
    """The official client, configured by OPENAI_API_KEY / OPENAI_BASE_URL as openai reads them."""
    try:
        import openai
    except ImportError as e:
        raise OpenWeightsError(
            'OpenAI models need the openai client: pip install "openweights[openai]"'
        ) from e
    return openai.AsyncOpenAI() if async_ else openai.OpenAI()


def _openai_kwargs(
    model: str, messages: list, stream: bool, timeout_s: float, kwargs: dict
) -> dict:
    return {
        "model": model.removeprefix("openai/"),
        "messages": messages,
        "stream": stream,
        "timeout": timeout_s,
        **kwargs,
    }


def _body(model: str, messages: list[dict[str, Any]], stream: bool, kwargs: dict) -> dict:
    body: dict[str, Any] = {"model": model, "messages": messages, **kwargs}
    if stream:
        body["stream"] = True
    return body


def _sse_payload(line: str) -> str | None:
    """The JSON of a `data:` line; None for other lines; "" at `[DONE]`."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    return "" if payload == "[DONE]" else payload


def _is_starting(e: APIStatusError) -> bool:
    return e.status_code == 503 and e.type == "deployment_starting"


def _is_not_deployed(e: APIStatusError) -> bool:
    return isinstance(e, NotFoundError) and e.type == "model_not_deployed"


class Stream:
    """Chunks of a streamed completion; iterate it (closes at the end) or use `with`."""

    def __init__(self, cm: Any, response: httpx.Response) -> None:
        self._cm = cm
        self.response = response

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        try:
            for line in self.response.iter_lines():
                payload = _sse_payload(line)
                if payload is None:
                    continue
                if payload == "":
                    break
                yield ChatCompletionChunk.model_validate_json(payload)
        finally:
            self.close()

    def close(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream:
    """Async twin of `Stream`: `async for chunk in stream`."""

    def __init__(self, cm: Any, response: httpx.Response) -> None:
        self._cm = cm
        self.response = response

    async def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        try:
            async for line in self.response.aiter_lines():
                payload = _sse_payload(line)
                if payload is None:
                    continue
                if payload == "":
                    break
                yield ChatCompletionChunk.model_validate_json(payload)
        finally:
            await self.close()

    async def close(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            await cm.__aexit__(None, None, None)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass
class _Batch:
    models: list[str] = field(default_factory=list)
    error: BaseException | None = None


# ---------------------------------------------------------------- sync


class Completions:
    """`ow.chat.completions`."""

    def __init__(self, chat: Chat) -> None:
        self._chat = chat

    def create(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        stream: bool = False,
        deploy: bool = True,
        timeout_s: float = TIMEOUT_S,
        **kwargs: Any,
    ) -> Any:
        """A chat completion (`ChatCompletion`), or a `Stream` of chunks with `stream=True`.

        Any other OpenAI parameter (`max_tokens`, `temperature`, `stop`, …) is passed on.
        `deploy=False`: a model with no deployment raises `NotFoundError` instead of deploying.
        OpenAI's own models (`gpt-4o-mini`, `o3`, `openai/<name>`) go to OpenAI with the official
        client (OPENAI_API_KEY, OPENAI_BASE_URL) and come back as its objects.
        """
        if is_openai_model(model):
            if self._chat._openai is None:
                self._chat._openai = _openai(async_=False)
            return self._chat._openai.chat.completions.create(
                **_openai_kwargs(model, messages, stream, timeout_s, kwargs)
            )
        body = _body(model, messages, stream, kwargs)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self._send(body, stream, timeout_s)
            except APIStatusError as e:
                if _is_not_deployed(e) and deploy:
                    self._chat._ensure(model)
                elif _is_starting(e) and time.monotonic() < deadline:
                    time.sleep(1.0)  # another client's deployment is loading: no event to wait on
                else:
                    raise

    def _send(self, body: dict, stream: bool, timeout_s: float) -> Any:
        http = self._chat._client._http
        if not stream:
            r = http.request("POST", PATH, json=body, timeout_s=timeout_s, retry=False)
            return ChatCompletion.model_validate_json(r.content)
        cm = http._client.stream("POST", PATH, json=body, timeout=http._timeout(timeout_s, 0))
        try:
            response = cm.__enter__()
        except httpx.TimeoutException as e:
            raise APITimeoutError(request=e.request) from e
        except httpx.TransportError as e:
            raise APIConnectionError(f"Could not reach {http.base_url}: {e}") from e
        if response.status_code >= 400:
            response.read()
            cm.__exit__(None, None, None)
            raise make_status_error(response)
        return Stream(cm, response)


class Chat:
    """`ow.chat`: `ow.chat.completions.create(...)`."""

    def __init__(
        self,
        client: OpenWeights,
        *,
        batch_window_s: float = 1.0,
        deploy_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._client = client
        self.completions = Completions(self)
        #: models first requested within this window are deployed together
        self.batch_window_s = batch_window_s
        #: options for the deployments it makes (`ow.api.deploy`'s keyword arguments)
        self.deploy_kwargs: dict[str, Any] = dict(deploy_kwargs or {})
        #: the deployments made for requests, by model
        self.deployments: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._batch: _Batch | None = None
        self._batch_done = threading.Event()
        self._openai: Any = None  # the official client, made on the first OpenAI model

    def _ensure(self, model: str) -> None:
        """Deploy `model` (with whatever else was requested in the same window) and wait."""
        with self._lock:
            batch = self._batch
            leader = batch is None
            if batch is None:
                batch = self._batch = _Batch()
                done = self._batch_done = threading.Event()
            else:
                done = self._batch_done
            if model not in batch.models:
                batch.models.append(model)
        if not leader:
            done.wait()
        else:
            try:
                time.sleep(self.batch_window_s)  # collect the others requested together
                with self._lock:
                    self._batch = None
                apis = self._client.api.multi_deploy(batch.models, **self.deploy_kwargs)
                unique = list(dict.fromkeys(apis.values()))
                for api in unique:
                    api.start()
                for api in unique:
                    api.wait_ready(keepalive=False)
                self.deployments.update(apis)
            except BaseException as e:
                batch.error = e
            finally:
                done.set()
        if batch.error is not None:
            raise batch.error

    def close(self) -> None:
        """Stop the deployments `ow.chat` made (they also stop by themselves when idle)."""
        for api in list(dict.fromkeys(self.deployments.values())):
            with contextlib.suppress(Exception):
                api.down()
        self.deployments.clear()


# ---------------------------------------------------------------- async


class AsyncCompletions:
    """`ow.chat.completions` of `AsyncOpenWeights`."""

    def __init__(self, chat: AsyncChat) -> None:
        self._chat = chat

    async def create(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        stream: bool = False,
        deploy: bool = True,
        timeout_s: float = TIMEOUT_S,
        **kwargs: Any,
    ) -> Any:
        """A chat completion, or an `AsyncStream` of chunks with `stream=True` (see `Completions`)."""
        if is_openai_model(model):
            if self._chat._openai is None:
                self._chat._openai = _openai(async_=True)
            return await self._chat._openai.chat.completions.create(
                **_openai_kwargs(model, messages, stream, timeout_s, kwargs)
            )
        body = _body(model, messages, stream, kwargs)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return await self._send(body, stream, timeout_s)
            except APIStatusError as e:
                if _is_not_deployed(e) and deploy:
                    await self._chat._ensure(model)
                elif _is_starting(e) and time.monotonic() < deadline:
                    await asyncio.sleep(1.0)
                else:
                    raise

    async def _send(self, body: dict, stream: bool, timeout_s: float) -> Any:
        http = self._chat._client._http
        if not stream:
            r = await http.request("POST", PATH, json=body, timeout_s=timeout_s, retry=False)
            return ChatCompletion.model_validate_json(r.content)
        cm = http._client.stream("POST", PATH, json=body, timeout=http._timeout(timeout_s, 0))
        try:
            response = await cm.__aenter__()
        except httpx.TimeoutException as e:
            raise APITimeoutError(request=e.request) from e
        except httpx.TransportError as e:
            raise APIConnectionError(f"Could not reach {http.base_url}: {e}") from e
        if response.status_code >= 400:
            await response.aread()
            await cm.__aexit__(None, None, None)
            raise make_status_error(response)
        return AsyncStream(cm, response)


class AsyncChat:
    """`ow.chat` of `AsyncOpenWeights`."""

    def __init__(
        self,
        client: AsyncOpenWeights,
        *,
        batch_window_s: float = 1.0,
        deploy_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._client = client
        self.completions = AsyncCompletions(self)
        self.batch_window_s = batch_window_s
        self.deploy_kwargs: dict[str, Any] = dict(deploy_kwargs or {})
        self.deployments: dict[str, Any] = {}
        self._batch: _Batch | None = None
        self._batch_done: asyncio.Event | None = None
        self._openai: Any = None  # the official async client, made on the first OpenAI model

    async def _ensure(self, model: str) -> None:
        batch = self._batch
        leader = batch is None
        if batch is None:
            batch = self._batch = _Batch()
            done = self._batch_done = asyncio.Event()
        else:
            assert self._batch_done is not None
            done = self._batch_done
        if model not in batch.models:
            batch.models.append(model)
        if not leader:
            await done.wait()
        else:
            try:
                await asyncio.sleep(self.batch_window_s)
                self._batch = None
                apis = self._client.api.multi_deploy(batch.models, **self.deploy_kwargs)
                unique = list(dict.fromkeys(apis.values()))
                for api in unique:
                    await api.start()
                await asyncio.gather(*(api.wait_ready(keepalive=False) for api in unique))
                self.deployments.update(apis)
            except BaseException as e:
                batch.error = e
            finally:
                done.set()
        if batch.error is not None:
            raise batch.error

    async def close(self) -> None:
        for api in list(dict.fromkeys(self.deployments.values())):
            with contextlib.suppress(Exception):
                await api.down()
        self.deployments.clear()
