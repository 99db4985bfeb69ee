"""`OpenWeights` and `AsyncOpenWeights`: credentials, resources, custom kinds.

Where the client connects, first match wins: the `base_url`/`api_key` arguments, then
`Settings` (`OPENWEIGHTS_URL`, `OPENWEIGHTS_API_KEY`), then the embedded local service, which
is started (or attached to) when no URL is configured at all.
"""

from __future__ import annotations

from typing import Any

import httpx

from openweights._exceptions import OpenWeightsError, ServiceError
from openweights._settings import Settings
from openweights.client._base import DEFAULT_TIMEOUT_S, AsyncHTTP, SyncHTTP
from openweights.client.custom_job import Jobs, lookup_kind, registered_kinds
from openweights.client.events import AsyncEvents, Events
from openweights.client.files import AsyncFiles, Files
from openweights.client.jobs import AsyncJobsResource, JobsResource
from openweights.client.models import AsyncModels, Models
from openweights.client.runs import AsyncRunLogger, AsyncRuns, RunLogger, Runs, outside_job_error
from openweights.client.secrets import AsyncSecrets, Secrets
from openweights.client.tokens import AsyncTokens, Tokens
from openweights.client.workers import AsyncWorkers, Workers
from openweights.types import MeResponse, SignupResponse

__all__ = ["AsyncOpenWeights", "OpenWeights", "resolve_credentials", "resolve_url", "signup"]


def _normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    # Our routes carry their own /v1: accept an OpenAI-style base URL too.
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _embedded(settings: Settings) -> Any:
    try:
        from openweights import service
    except ImportError as e:  # pragma: no cover - a broken install
        raise ServiceError(
            f"No OPENWEIGHTS_URL is set and the embedded service cannot be imported ({e}). "
            "Set OPENWEIGHTS_URL and OPENWEIGHTS_API_KEY to use a server."
        ) from e
    return service.ensure_running(settings)


def resolve_url(*, base_url: str | None, settings: Settings) -> str:
    """The server URL: argument, `OPENWEIGHTS_URL`, or the embedded service (started if needed)."""
    url = base_url or settings.url
    return _normalize_url(url) if url else _normalize_url(_embedded(settings).url)


def resolve_credentials(
    *, api_key: str | None, base_url: str | None, settings: Settings
) -> tuple[str, str]:
    """(url, api key) the client uses; see the module docstring for the order."""
    url = base_url or settings.url
    key = api_key or settings.api_key
    if not url:
        creds = _embedded(settings)
        return _normalize_url(creds.url), key or creds.api_key
    if not key:
        raise OpenWeightsError(
            f"No API key for the openweights server at {url}: set OPENWEIGHTS_API_KEY "
            "(or pass api_key=...). Get one with `ow signup ORG_NAME --url URL` on a new "
            "server, or `ow token create` where you are already signed in."
        )
    return _normalize_url(url), key


class _ClientBase:
    """What the twins share: credentials, settings, `ow.<kind>` lookup. No I/O here."""

    _kinds: dict[str, Jobs]

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        settings: Settings | None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        self.base_url, self.api_key = resolve_credentials(
            api_key=api_key, base_url=base_url, settings=self.settings
        )
        self._kinds = {}
        self._run: Any = None

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally: registered job kinds (`ow.addition`).
        if name.startswith("_"):
            raise AttributeError(name)
        cls = lookup_kind(name)
        if cls is None:
            raise AttributeError(
                f"{type(self).__name__!r} object has no attribute {name!r} "
                f"(custom job kinds appear here after @register({name!r}))."
            )
        kinds = self.__dict__.setdefault("_kinds", {})
        kind = kinds.get(name)
        if type(kind) is not cls:  # first use, or re-registered (e.g. a notebook cell rerun)
            kind = kinds[name] = cls(self)  # type: ignore[arg-type]
        return kind

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(registered_kinds()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    def _run_id(self) -> int:
        if self.settings.run_id is None:
            raise outside_job_error()
        return self.settings.run_id


class OpenWeights(_ClientBase):
    """The openweights client: `ow.files`, `ow.jobs`, `ow.events`, `ow.run`, `ow.<kind>` …"""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        settings: Settings | None = None,
        max_retries: int = 3,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(api_key=api_key, base_url=base_url, settings=settings)
        self._http = SyncHTTP(
            self.base_url,
            self.api_key,
            max_retries=max_retries,
            timeout_s=timeout_s,
            transport=transport,
        )
        self.files = Files(self)
        self.jobs = JobsResource(self)
        self.runs = Runs(self)
        self.events = Events(self)
        self.tokens = Tokens(self)
        self.secrets = Secrets(self)
        self.workers = Workers(self)
        self.models = Models(self)
        from openweights.client.api import Deployments
        from openweights.client.chat import Chat

        self.api = Deployments(self)
        self.chat = Chat(self)
        from openweights.client.cluster import Cluster

        self.cluster = Cluster(self)

    @property
    def run(self) -> RunLogger:
        """The run this process is (inside a job only): `ow.run.log({...})`."""
        if self._run is None:
            self._run = RunLogger(self, self._run_id())
        return self._run

    def me(self) -> MeResponse:
        """The organization and token this client acts as."""
        return MeResponse.model_validate(self._http.request("GET", "/v1/me").json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpenWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncOpenWeights(_ClientBase):
    """The asyncio twin of `OpenWeights`: the same resources, awaited."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        settings: Settings | None = None,
        max_retries: int = 3,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(api_key=api_key, base_url=base_url, settings=settings)
        self._http = AsyncHTTP(
            self.base_url,
            self.api_key,
            max_retries=max_retries,
            timeout_s=timeout_s,
            transport=transport,
        )
        self.files = AsyncFiles(self)
        self.jobs = AsyncJobsResource(self)
        self.runs = AsyncRuns(self)
        self.events = AsyncEvents(self)
        self.tokens = AsyncTokens(self)
        self.secrets = AsyncSecrets(self)
        self.workers = AsyncWorkers(self)
        self.models = AsyncModels(self)
        from openweights.client.api import AsyncDeployments
        from openweights.client.chat import AsyncChat

        self.api = AsyncDeployments(self)
        self.chat = AsyncChat(self)
        from openweights.client.cluster import AsyncCluster

        self.cluster = AsyncCluster(self)

    @property
    def run(self) -> AsyncRunLogger:
        """The run this process is (inside a job only): `await ow.run.log({...})`."""
        if self._run is None:
            self._run = AsyncRunLogger(self, self._run_id())
        return self._run

    async def me(self) -> MeResponse:
        """The organization and token this client acts as."""
        return MeResponse.model_validate((await self._http.request("GET", "/v1/me")).json())

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> AsyncOpenWeights:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def signup(
    org_name: str,
    *,
    email: str | None = None,
    base_url: str | None = None,
    settings: Settings | None = None,
    transport: httpx.BaseTransport | None = None,
) -> SignupResponse:
    """Create an organization and its first user token on a server (default: the embedded one).

    The token's secret (`response.token.token`) is shown only once.
    """
    from pydantic import ValidationError

    from openweights.client._errors import format_validation_error
    from openweights.types import SignupRequest

    try:
        body = SignupRequest(org_name=org_name, email=email).model_dump(exclude_none=True)
    except ValidationError as e:
        raise format_validation_error("signup", e) from None
    url = resolve_url(base_url=base_url, settings=settings if settings is not None else Settings())
    http = SyncHTTP(url, None, transport=transport)
    try:
        return SignupResponse.model_validate(http.request("POST", "/v1/signup", json=body).json())
    finally:
        http.close()
