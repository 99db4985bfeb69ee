"""The OpenAI wire API: `/v1/chat/completions` and `/v1/completions`, routed to deployments.

A deployment is a running `api` job that logged `{"type": "deployment", "base_url", "api_key",
"models"}`. A request names a `model`; the server forwards it, unchanged, to the running
deployment of the caller's organization that serves that model, with the deployment's own key,
and passes the answer back (SSE streams chunk by chunk). Nothing crosses organizations: another
org's deployments are not even looked at.

Routes are cached per organization (`DeploymentRoutes`), so a request pays no database trip;
any change of one of the org's jobs (`job:` notifications: cancel, completion, a lost run) and any
connection error to a deployment drops the cache.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from openweights.server.auth import principal, require
from openweights.server.routes._errors import ERROR_RESPONSES
from openweights.store import jobs as q
from openweights.store.orgs import Principal

__all__ = ["DeploymentRoutes", "Route", "router"]

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERROR_RESPONSES)

#: A cached route table is re-read at least this often (notifications drop it sooner).
ROUTES_TTL_S = 30.0
#: Deployments looked at per organization.
MAX_DEPLOYMENTS = 200


@dataclass(frozen=True)
class Route:
    job_id: str
    run_id: int
    base_url: str
    api_key: str


@dataclass
class _Table:
    loaded_at: float
    routes: dict[str, Route]
    #: model → id of a deployment job serving it that has not answered yet
    starting: dict[str, str] = field(default_factory=dict)
    by_job: dict[str, Route] = field(default_factory=dict)


def _models_of(job: dict) -> list[str]:
    vp = (job.get("params") or {}).get("validated_params") or {}
    names = [vp.get("model"), *(vp.get("lora_adapters") or [])]
    return [n for n in names if isinstance(n, str)]


def load_table(conn: Any, org_id: str) -> _Table:
    """The org's deployments: running ones by model, and those still starting."""
    table = _Table(loaded_at=time.monotonic(), routes={})
    live, _ = q.list_jobs(conn, org_id, status="in_progress", type="api", limit=MAX_DEPLOYMENTS)
    for job in live:
        info = None
        run_id = job.get("current_run_id")
        if run_id is not None:
            events, _ = q.list_events(
                conn, org_id, job_id=None, run_id=run_id, after=None, limit=1000
            )
            for e in events:
                data = e["data"]
                if isinstance(data, str):
                    data = json.loads(data)
                if isinstance(data, dict) and data.get("type") == "deployment":
                    info = data
        if info is None:
            for m in _models_of(job):
                table.starting.setdefault(m, job["id"])
            continue
        route = Route(job["id"], run_id, str(info["base_url"]).rstrip("/"), str(info["api_key"]))
        table.by_job[job["id"]] = route
        for m in info.get("models") or []:
            table.routes.setdefault(m, route)  # newest deployment first
    pending, _ = q.list_jobs(conn, org_id, status="pending", type="api", limit=MAX_DEPLOYMENTS)
    for job in pending:
        for m in _models_of(job):
            table.starting.setdefault(m, job["id"])
    return table


class _Upstream:
    """An answer of a deployment: status, content type, and its body as chunks."""

    def __init__(self, status: int, content_type: str, chunks: Any, close: Any) -> None:
        self.status = status
        self.content_type = content_type
        self.chunks = chunks
        self.close = close


class UpstreamUnreachable(Exception):
    """The deployment could not be connected to."""


def _aiohttp() -> Any:
    try:
        import aiohttp
    except ImportError:
        return None
    return aiohttp


class DeploymentRoutes:
    """Per-org route tables and the one keep-alive HTTP client to deployments.

    The client is aiohttp when installed (`openweights[fast]`): it spends about a fifth of the
    CPU per forwarded request that httpx does (0.5 vs 2.7 ms measured here), which is most of
    what routing costs; httpx otherwise."""

    def __init__(self) -> None:
        self._tables: dict[str, _Table] = {}
        self._http: httpx.AsyncClient | None = None
        self._session: Any = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=10.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                trust_env=False,
            )
        return self._http

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> _Upstream:
        """POST and return once the answer's headers are in; the body streams from `chunks`."""
        aiohttp = _aiohttp()
        if aiohttp is not None:
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                    connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                    auto_decompress=False,
                    skip_auto_headers=("Accept-Encoding", "User-Agent"),
                )
            try:
                r = await self._session.post(url, data=body, headers=headers)
            except aiohttp.ClientConnectionError as e:
                raise UpstreamUnreachable(str(e) or type(e).__name__) from e
            return _Upstream(
                r.status,
                r.headers.get("content-type", "application/json"),
                r.content.iter_any(),
                r.release,
            )
        try:
            r = await self.http.send(
                self.http.build_request("POST", url, content=body, headers=headers), stream=True
            )
        except httpx.TransportError as e:
            raise UpstreamUnreachable(str(e) or type(e).__name__) from e
        return _Upstream(
            r.status_code,
            r.headers.get("content-type", "application/json"),
            r.aiter_raw(),
            r.aclose,
        )

    def drop(self, key: str) -> None:
        """Notifier hook for `job:<org>:<job id>` keys: that org's table is stale."""
        org = key.split(":", 2)[1] if key.count(":") >= 2 else None
        if org is None:
            self._tables.clear()
        else:
            self._tables.pop(org, None)

    def cached(self, org_id: str) -> _Table | None:
        t = self._tables.get(org_id)
        if t is not None and time.monotonic() - t.loaded_at > ROUTES_TTL_S:
            self._tables.pop(org_id, None)
            return None
        return t

    async def table(self, state: Any, org_id: str, *, fresh: bool = False) -> _Table:
        t = None if fresh else self.cached(org_id)
        if t is None:

            def work():
                with state.db.read() as conn:
                    return load_table(conn, org_id)

            t = await state.call(work)
            self._tables[org_id] = t
        return t

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._session is not None:
            await self._session.close()
            self._session = None


def _routes(request: Request) -> DeploymentRoutes:
    state = request.app.state.ow
    routes = getattr(state, "deployments", None)
    if routes is None:  # a state without the hook (never in `create_app`): no cache invalidation
        routes = state.deployments = DeploymentRoutes()
    return routes


def _error(status: int, type_: str, message: str, param: str | None = None, headers=None):
    return JSONResponse(
        {"error": {"type": type_, "message": message, "param": param}},
        status_code=status,
        headers=headers,
    )


def _not_deployed(model: str, starting: str | None) -> JSONResponse:
    if starting is not None:
        return _error(
            503,
            "deployment_starting",
            f"Deployment {starting!r} of model {model!r} is starting; retry shortly.",
            "model",
            headers={"retry-after": "2"},
        )
    return _error(
        404,
        "model_not_deployed",
        f"No running deployment serves model {model!r} in your organization. Deploy it with "
        f"ow.api.deploy({model!r}) (ow.chat.completions.create deploys it for you).",
        "model",
    )


async def _forward(request: Request, p: Principal, path: str) -> Response:
    require(p, "user", "run")
    state = request.app.state.ow
    raw = await request.body()
    try:
        model = json.loads(raw).get("model")
    except (ValueError, AttributeError):
        return _error(400, "invalid_request", "The body must be a JSON object.")
    if not isinstance(model, str) or not model:
        return _error(400, "invalid_request", "`model` is required (a string).", "model")
    routes = _routes(request)
    table = await routes.table(state, p.org_id)
    route = table.routes.get(model)
    if route is None:  # a miss is never cached: a deployment may have come up since
        table = await routes.table(state, p.org_id, fresh=True)
        route = table.routes.get(model)
        if route is None:
            return _not_deployed(model, table.starting.get(model))
    headers = {
        "content-type": "application/json",
        "authorization": f"Bearer {route.api_key}",
        "accept": request.headers.get("accept", "application/json"),
    }
    for attempt in (0, 1):
        try:
            upstream = await routes.post(f"{route.base_url}/{path}", raw, headers)
            break
        except UpstreamUnreachable as e:
            # the deployment went away (idle stop, cancel, lost worker): look again once
            table = await routes.table(state, p.org_id, fresh=True)
            fresh = table.routes.get(model)
            if attempt or fresh is None or fresh == route:
                if fresh is None:
                    return _not_deployed(model, table.starting.get(model))
                return _error(
                    502,
                    "deployment_unreachable",
                    f"Deployment {route.job_id!r} of model {model!r} did not answer: {e}",
                    "model",
                )
            route = fresh
            headers["authorization"] = f"Bearer {route.api_key}"
    out_headers = {"x-openweights-deployment": route.job_id}
    if "text/event-stream" in upstream.content_type:
        out_headers["cache-control"] = "no-cache"
        return StreamingResponse(
            upstream.chunks,
            status_code=upstream.status,
            media_type=upstream.content_type,
            headers=out_headers,
            background=BackgroundTask(_close, upstream),
        )
    try:
        content = b"".join([chunk async for chunk in upstream.chunks])
    finally:
        await _close(upstream)
    return Response(
        content, status_code=upstream.status, media_type=upstream.content_type, headers=out_headers
    )


async def _close(upstream: _Upstream) -> None:
    result = upstream.close()
    if hasattr(result, "__await__"):
        await result


_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {
                        "model": {"type": "string", "minLength": 1},
                        "stream": {"type": "boolean"},
                    },
                    "additionalProperties": True,
                }
            }
        },
    }
}


@router.post("/chat/completions", openapi_extra=_BODY)
async def chat_completions(request: Request, p: Principal = Depends(principal)) -> Response:
    """OpenAI chat completions (`stream: true` too), answered by the deployment serving `model`."""
    return await _forward(request, p, "chat/completions")


@router.post("/completions", openapi_extra=_BODY)
async def completions(request: Request, p: Principal = Depends(principal)) -> Response:
    """OpenAI text completions (`stream: true` too), answered by the deployment serving `model`."""
    return await _forward(request, p, "completions")


@router.post("/deployments/{job_id}/keepalive", tags=["deployments"])
async def keepalive(job_id: str, request: Request, p: Principal = Depends(principal)) -> dict:
    """Reset a running deployment's idle clock (what `api.up()` sends while it is held)."""
    require(p, "user", "run")
    state = request.app.state.ow
    routes = _routes(request)
    table = await routes.table(state, p.org_id)
    route = table.by_job.get(job_id)
    if route is None:
        table = await routes.table(state, p.org_id, fresh=True)
        route = table.by_job.get(job_id)
    if route is None:
        if job_id in table.starting.values():
            return {"status": "starting", "job_id": job_id}
        return _error(  # type: ignore[return-value]
            404, "not_found", f"No running deployment {job_id!r} in your organization.", "job_id"
        )
    try:
        r = await routes.http.post(
            f"{route.base_url.removesuffix('/v1')}/ow/keepalive",
            headers={"authorization": f"Bearer {route.api_key}"},
            timeout=10.0,
        )
    except httpx.TransportError as e:
        routes.drop(f"job:{p.org_id}:{job_id}")
        return _error(  # type: ignore[return-value]
            502, "deployment_unreachable", f"Deployment {job_id!r} did not answer: {e}", "job_id"
        )
    return {
        "status": "ok" if r.status_code == 200 else f"answered {r.status_code}",
        "job_id": job_id,
    }
