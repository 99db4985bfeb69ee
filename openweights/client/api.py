"""`ow.api`: OpenAI-compatible deployments of open-weight models, served by a job on a worker.

```python
with ow.api.deploy("unsloth/Qwen3-4B") as api:       # or: async with …; or api.up() … api.down()
    ow.chat.completions.create(model="unsloth/Qwen3-4B", messages=[...])
    OpenAI(base_url=api.base_url, api_key=api.api_key)  # the official client works too
```

A deployment is an `api` job (`openweights.jobs.api`): `vllm serve` on CUDA, `transformers serve`
on CPU, for one base model and its LoRA adapters. Requests go to the openweights server's own
`/v1/chat/completions` (`api.base_url`), authenticated with the org's API key (`api.api_key`);
the server forwards them to the deployment. It stops when `down()` is called (context exit),
when its job is canceled, and after `idle_timeout_s` without requests; while `up()` holds it,
the client keeps it alive.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openweights._exceptions import ConflictError, NotFoundError, OpenWeightsError
from openweights.jobs.api import DEFAULT_IDLE_TIMEOUT_S, ApiJobs

if TYPE_CHECKING:
    from openweights.client._client import AsyncOpenWeights, OpenWeights

__all__ = ["API", "AsyncAPI", "AsyncDeployments", "DeploymentError", "Deployments"]

#: Seconds between looks at a starting deployment's events.
POLL_S = 0.2
#: Default limit for `up()`: a large model's first download can take long.
UP_TIMEOUT_S = 3600.0
_LOG_TAIL = 3000


class DeploymentError(OpenWeightsError):
    """A deployment failed to start or stopped; the message carries its log's tail."""

    def __init__(self, message: str, *, job: Any = None) -> None:
        super().__init__(message)
        self.job = job


def _adapter_config(ref: str) -> dict[str, Any] | None:
    path = Path(ref).expanduser() / "adapter_config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None
    return None


def _lora_rank(refs: list[str]) -> int:
    ranks = [int(c.get("r") or 16) for c in map(_adapter_config, refs) if c]
    return max(ranks, default=16)


def _deploy_params(
    model: str,
    *,
    lora_adapters: list[str] | None,
    max_lora_rank: int | str,
    max_model_len: int,
    max_num_seqs: int,
    quantization: str | None,
    kv_cache_dtype: str | None,
    requires_vram_gb: float | str,
    allowed_hardware: list[str] | None,
    idle_timeout_s: float,
    engine: str,
) -> dict[str, Any]:
    adapters = list(lora_adapters or [])
    if max_lora_rank == "guess":
        max_lora_rank = _lora_rank([model, *adapters])
    params: dict[str, Any] = {
        "model": model,
        "lora_adapters": adapters,
        "max_lora_rank": max_lora_rank,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "quantization": quantization,
        "kv_cache_dtype": kv_cache_dtype,
        "idle_timeout_s": idle_timeout_s,
        "engine": engine,
        "requires_vram_gb": requires_vram_gb,
        "max_attempts": 1,
    }
    if allowed_hardware:
        params["allowed_hardware"] = allowed_hardware
    return params


def _suffix() -> str:
    # each up() is its own deployment: a stopped one (completed) cannot be resubmitted
    return secrets.token_hex(4)


def _tail_message(job: Any, log: str) -> str:
    why = job.error or f"the job is {job.status}"
    tail = log[-_LOG_TAIL:] if log else "(no log)"
    return (
        f"Deployment {job.id!r} of {job.model or 'the model'!r} did not start: {why}\n"
        f"--- log tail ---\n{tail}"
    )


def _deployment_event(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    for e in events:
        data = e.get("data") or {}
        if data.get("type") == "deployment":
            return data
    return None


class _APIBase:
    """What both twins hold; no I/O here."""

    def __init__(self, client: Any, params: dict[str, Any]) -> None:
        self._client = client
        self._params = params
        self.model: str = params["model"]
        self.lora_adapters: list[str] = list(params.get("lora_adapters") or [])
        #: the `api` job serving this deployment (set by `up()`)
        self.job_id: str | None = None
        #: the names the deployment answers to (set once it is up)
        self.models: list[str] = []
        self.engine: str | None = None
        self._cursor: int | None = None
        self._ready = False
        self._stopped = False

    @property
    def base_url(self) -> str:
        """OpenAI base URL: the openweights server's `/v1`."""
        return f"{self._client.base_url}/v1"

    @property
    def api_key(self) -> str:
        """The key for `base_url`: your openweights API key."""
        return self._client.api_key

    @property
    def is_up(self) -> bool:
        return self._ready

    @property
    def idle_timeout_s(self) -> float:
        return float(self._params.get("idle_timeout_s") or DEFAULT_IDLE_TIMEOUT_S)

    def _keepalive_every_s(self) -> float:
        return max(0.5, min(60.0, self.idle_timeout_s / 3))

    def _take(self, info: dict[str, Any]) -> None:
        self.models = list(info.get("models") or [])
        self.engine = info.get("engine")
        self._ready = True

    def __repr__(self) -> str:
        state = "up" if self._ready else ("starting" if self.job_id else "down")
        return f"{type(self).__name__}(model={self.model!r}, job_id={self.job_id!r}, {state})"


class API(_APIBase):
    """A deployment of the sync client: `up()`/`down()`, `with`, and `async with`."""

    def __init__(self, client: OpenWeights, params: dict[str, Any]) -> None:
        super().__init__(client, params)
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    @property
    def chat(self) -> Any:
        """`api.chat.completions.create(...)`: `ow.chat` of the client (as an OpenAI client has)."""
        return self._client.chat

    def start(self) -> API:
        """Submit the deployment's job without waiting for it (see `wait_ready`)."""
        if self.job_id is None or self._stopped:
            job = ApiJobs(self._client).create(**{**self._params, "job_id_suffix": _suffix()})
            self.job_id, self._stopped, self._cursor = job.id, False, None
        return self

    def wait_ready(self, *, timeout_s: float = UP_TIMEOUT_S, keepalive: bool = True) -> API:
        """Wait until the deployment answers; `DeploymentError` with its log tail if it fails.

        `keepalive`: keep it up while this object lives (until `down()`), else it stops after
        its idle timeout without requests."""
        assert self.job_id is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        next_status = 0.0
        while not self._ready:
            body = self._client._http.request(
                "GET", "/v1/events", params={"job_id": self.job_id, "after": self._cursor}
            ).json()
            events = body.get("data") or []
            if events:
                self._cursor = events[-1]["id"]
            info = _deployment_event(events)
            if info is not None:
                self._take(info)
                break
            now = time.monotonic()
            if now >= next_status:
                job = self._client.jobs.retrieve(self.job_id)
                if job.done:
                    raise DeploymentError(_tail_message(job, self._log(job)), job=job)
                next_status = now + 1.0
            if now > deadline:
                self.down()
                raise DeploymentError(
                    f"Deployment {self.job_id!r} of {self.model!r} was not up within {timeout_s:g} s."
                )
            time.sleep(POLL_S)  # events have no long-poll: a short poll, bounded by the deadline
        if keepalive:
            self._start_keepalive()
        return self

    def up(self, *, timeout_s: float = UP_TIMEOUT_S) -> API:
        """Start the deployment and wait until it answers; returns this API."""
        return self.start().wait_ready(timeout_s=timeout_s)

    def down(self) -> None:
        """Stop the deployment (cancel its job)."""
        self._stop.set()
        if self._keeper is not None and self._keeper is not threading.current_thread():
            self._keeper.join(5)
        self._keeper = None
        if self.job_id is not None:
            try:
                self._client.jobs.cancel(self.job_id)
            except ConflictError:  # it already ended (idle stop, failure)
                pass
        self._ready = False
        self._stopped = True  # `job_id` stays, for its logs; the next `up()` starts a new job

    def _log(self, job: Any) -> str:
        try:
            runs = self._client.runs.list(job_id=job.id)
            if not runs:
                return ""
            run = runs[-1]
            if run.log_file:
                return self._client.files.content(run.log_file).decode(errors="replace")
            return self._client.runs.log_content(run.id).decode(errors="replace")
        except OpenWeightsError:
            return ""

    def _start_keepalive(self) -> None:
        self._stop = threading.Event()
        job_id = self.job_id

        def loop() -> None:
            http = self._client._http
            while not self._stop.wait(self._keepalive_every_s()) and not http.closed:
                try:
                    http.request("POST", f"/v1/deployments/{job_id}/keepalive")
                except RuntimeError:
                    if http.closed:  # the client was closed between the check and the call
                        return
                    raise
                except NotFoundError:
                    self._ready = False
                    return  # it stopped (canceled elsewhere, failed)
                except OpenWeightsError:
                    continue

        self._keeper = threading.Thread(target=loop, name=f"ow-keepalive-{job_id}", daemon=True)
        self._keeper.start()

    def __enter__(self) -> API:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    async def __aenter__(self) -> API:
        return await asyncio.to_thread(self.up)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.down)


class AsyncAPI(_APIBase):
    """A deployment of `AsyncOpenWeights`: `await api.up()`, `async with`."""

    def __init__(self, client: AsyncOpenWeights, params: dict[str, Any]) -> None:
        super().__init__(client, params)
        self._keeper: asyncio.Task | None = None

    @property
    def chat(self) -> Any:
        return self._client.chat

    async def start(self) -> AsyncAPI:
        """Submit the deployment's job without waiting for it (see `wait_ready`)."""
        if self.job_id is None or self._stopped:
            job = await ApiJobs(self._client).create(**{**self._params, "job_id_suffix": _suffix()})
            self.job_id, self._stopped, self._cursor = job.id, False, None
        return self

    async def wait_ready(
        self, *, timeout_s: float = UP_TIMEOUT_S, keepalive: bool = True
    ) -> AsyncAPI:
        """Wait until the deployment answers; `DeploymentError` with its log tail if it fails."""
        assert self.job_id is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        next_status = 0.0
        while not self._ready:
            response = await self._client._http.request(
                "GET", "/v1/events", params={"job_id": self.job_id, "after": self._cursor}
            )
            events = response.json().get("data") or []
            if events:
                self._cursor = events[-1]["id"]
            info = _deployment_event(events)
            if info is not None:
                self._take(info)
                break
            now = time.monotonic()
            if now >= next_status:
                job = await self._client.jobs.retrieve(self.job_id)
                if job.done:
                    raise DeploymentError(_tail_message(job, await self._log(job)), job=job)
                next_status = now + 1.0
            if now > deadline:
                await self.down()
                raise DeploymentError(
                    f"Deployment {self.job_id!r} of {self.model!r} was not up within {timeout_s:g} s."
                )
            await asyncio.sleep(POLL_S)
        if keepalive:
            self._keeper = asyncio.create_task(self._keepalive(self.job_id))
        return self

    async def up(self, *, timeout_s: float = UP_TIMEOUT_S) -> AsyncAPI:
        await self.start()
        return await self.wait_ready(timeout_s=timeout_s)

    async def down(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        if self.job_id is not None:
            try:
                await self._client.jobs.cancel(self.job_id)
            except ConflictError:
                pass
        self._ready = False
        self._stopped = True  # `job_id` stays, for its logs; the next `up()` starts a new job

    async def _log(self, job: Any) -> str:
        try:
            runs = await self._client.runs.list(job_id=job.id)
            if not runs:
                return ""
            run = runs[-1]
            if run.log_file:
                return (await self._client.files.content(run.log_file)).decode(errors="replace")
            return (await self._client.runs.log_content(run.id)).decode(errors="replace")
        except OpenWeightsError:
            return ""

    async def _keepalive(self, job_id: str | None) -> None:
        while True:
            await asyncio.sleep(self._keepalive_every_s())
            try:
                await self._client._http.request("POST", f"/v1/deployments/{job_id}/keepalive")
            except NotFoundError:
                self._ready = False
                return
            except OpenWeightsError:
                continue

    async def __aenter__(self) -> AsyncAPI:
        return await self.up()

    async def __aexit__(self, *exc: object) -> None:
        await self.down()


# ---------------------------------------------------------------- grouping by base model


def _base_of(ref: str, registry: Any) -> str:
    """The base model a reference is a LoRA adapter of, or the reference itself."""
    config = _adapter_config(ref)
    if config is not None:
        return config.get("base_model_name_or_path") or ref
    if registry is not None and "/" in ref and not ref.startswith(("/", ".", "~")):
        try:
            entry = registry(ref)
        except OpenWeightsError:
            return ref
        if getattr(entry, "kind", None) == "adapter" and getattr(entry, "base_model", None):
            return entry.base_model
    return ref


def group_by_base(models: list[str], registry: Any = None) -> dict[str, list[str]]:
    """`{base: [the models given that are it or its adapters]}`, in the order given."""
    groups: dict[str, list[str]] = {}
    for m in dict.fromkeys(models):
        groups.setdefault(_base_of(m, registry), []).append(m)
    return groups


class _DeploymentsBase:
    def __init__(self, client: Any) -> None:
        self._client = client

    def _params(self, model: str, **kw: Any) -> dict[str, Any]:
        return _deploy_params(model, **kw)

    def _groups(self, models: list[str]) -> dict[str, list[str]]:
        registry = getattr(getattr(self._client, "models", None), "retrieve", None)
        if asyncio.iscoroutinefunction(registry):
            registry = None  # async client: local adapters only (no blocking lookups here)
        return group_by_base(models, registry)


_DEPLOY_DOC = """Deploy `model` (a Hub id, local path, registered model or LoRA adapter).

        `lora_adapters`: adapters of `model` served by the same server. `max_lora_rank="guess"`:
        the largest rank of the adapters given (16 when unknown). `requires_vram_gb="guess"`:
        see `openweights.jobs.api.estimate_vram_gb`. `idle_timeout_s`: stop after this long
        without requests when nobody holds `up()`. Nothing starts before `up()` (or `with`)."""


class Deployments(_DeploymentsBase):
    """`ow.api`."""

    def deploy(
        self,
        model: str,
        *,
        lora_adapters: list[str] | None = None,
        max_lora_rank: int | str = "guess",
        max_model_len: int = 2048,
        requires_vram_gb: float | str = "guess",
        max_num_seqs: int = 100,
        quantization: str | None = None,
        kv_cache_dtype: str | None = None,
        allowed_hardware: list[str] | None = None,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        engine: str = "auto",
    ) -> API:
        return API(
            self._client,
            _deploy_params(
                model,
                lora_adapters=lora_adapters,
                max_lora_rank=max_lora_rank,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                quantization=quantization,
                kv_cache_dtype=kv_cache_dtype,
                requires_vram_gb=requires_vram_gb,
                allowed_hardware=allowed_hardware,
                idle_timeout_s=idle_timeout_s,
                engine=engine,
            ),
        )

    deploy.__doc__ = _DEPLOY_DOC

    def multi_deploy(self, models: list[str], **deploy_kwargs: Any) -> dict[str, API]:
        """One API per base model; all LoRA adapters of a base share its server.

        Returns `{model: API}` for every model given (adapters of one base map to one API)."""
        out: dict[str, API] = {}
        for base, group in self._groups(models).items():
            adapters = [m for m in group if m != base]
            api = self.deploy(base, lora_adapters=adapters, **deploy_kwargs)
            for m in group:
                out[m] = api
        return out


class AsyncDeployments(_DeploymentsBase):
    """`ow.api` of `AsyncOpenWeights`."""

    def deploy(
        self,
        model: str,
        *,
        lora_adapters: list[str] | None = None,
        max_lora_rank: int | str = "guess",
        max_model_len: int = 2048,
        requires_vram_gb: float | str = "guess",
        max_num_seqs: int = 100,
        quantization: str | None = None,
        kv_cache_dtype: str | None = None,
        allowed_hardware: list[str] | None = None,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        engine: str = "auto",
    ) -> AsyncAPI:
        return AsyncAPI(
            self._client,
            _deploy_params(
                model,
                lora_adapters=lora_adapters,
                max_lora_rank=max_lora_rank,
                max_model_len=max_model_len,
                max_num_seqs=max_num_seqs,
                quantization=quantization,
                kv_cache_dtype=kv_cache_dtype,
                requires_vram_gb=requires_vram_gb,
                allowed_hardware=allowed_hardware,
                idle_timeout_s=idle_timeout_s,
                engine=engine,
            ),
        )

    deploy.__doc__ = _DEPLOY_DOC

    def multi_deploy(self, models: list[str], **deploy_kwargs: Any) -> dict[str, AsyncAPI]:
        """One API per base model; all LoRA adapters of a base share its server."""
        out: dict[str, AsyncAPI] = {}
        for base, group in self._groups(models).items():
            adapters = [m for m in group if m != base]
            api = self.deploy(base, lora_adapters=adapters, **deploy_kwargs)
            for m in group:
                out[m] = api
        return out
