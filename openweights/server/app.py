"""The openweights server: one FastAPI app for the SDK, the CLI, workers and the OpenAI wire API."""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openweights import __version__ as VERSION
from openweights._settings import Settings
from openweights.server.notify import job_key, queue_key, run_key
from openweights.server.state import AppState
from openweights.store import jobs as q
from openweights.store.errors import StoreError

log = logging.getLogger(__name__)


def _error(
    status: int, type_: str, message: str, param: str | None = None, headers=None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": type_, "message": message, "param": param}},
        status_code=status,
        headers=headers,
    )


async def sweep_once(state: AppState) -> int:
    """Mark runs whose lease lapsed as lost; requeue or fail their jobs."""

    def work():
        woken: list[str] = []
        with state.db.read() as conn:
            ids = q.expired_runs(conn, state.db.now(conn))
        for run_id in ids:
            with state.db.write() as conn:
                now = state.db.now(conn)
                job = q.lose_run(
                    conn, run_id, now, "lease expired: its worker stopped heartbeating"
                )
                if job is not None:
                    keys = [
                        queue_key(job["org_id"]),
                        job_key(job["org_id"], job["id"]),
                        run_key(run_id),
                        f"auth:run:{run_id}",
                    ]
                    state.publish(conn, *keys)
                    woken += keys
                    log.warning(
                        "run %s lost its lease; job %s is now %s", run_id, job["id"], job["status"]
                    )
        return woken

    keys = await state.call(work)
    state.notifier.notify(*keys)
    return len(keys)


async def _sweeper(state: AppState) -> None:
    interval = min(max(state.settings.lease_s / 10, 0.2), 2.0)
    while True:
        try:
            await sweep_once(state)
        except Exception:  # keep sweeping: one bad pass must not stop lease expiry for good
            log.exception("lease sweep failed")
        await asyncio.sleep(interval)


class RequestIdMiddleware:
    """`x-request-id` on every answer (the caller's, or a new one), and a JSON 500 naming it
    instead of a stack trace. Plain ASGI: `@app.middleware("http")` costs a task and two memory
    streams per request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value.decode("latin-1")
                break
        rid = rid or uuid.uuid4().hex[:16]
        header = (b"x-request-id", rid.encode("latin-1"))
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # never a stack trace to a client
            log.exception("unhandled error (request %s)", rid)
            if started:
                raise
            response = _error(500, "server_error", f"Internal server error (request {rid}).")
            response.headers["x-request-id"] = rid
            await response(scope, receive, send)


class _App(FastAPI):
    """FastAPI, with the queue's hot routes (`fast.FastPath`) tried before any of FastAPI's own
    per-request work (its telemetry check, its middleware stack); every request FastPath does
    not answer goes through the whole stack as before."""

    fast = None

    async def __call__(self, scope, receive, send) -> None:
        if self.fast is not None and scope["type"] == "http":
            return await self.fast(scope, receive, send)
        return await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = AppState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.call(state.db.migrate)

        def grace():
            with state.db.write() as conn:
                q.grace_live_leases(conn, state.db.now(conn), state.settings.lease_s)

        await state.call(grace)
        state.notifier.bind(asyncio.get_running_loop())
        if not state.db.is_sqlite:
            state.notifier.listen_postgres(state.db.url)
        sweeper = asyncio.create_task(_sweeper(state))
        try:
            yield
        finally:
            sweeper.cancel()
            state.notifier.close()
            if getattr(state, "pg_claim", None) is not None:
                await state.pg_claim.close()
            if getattr(state, "hot", None) is not None:
                state.hot.close()
            await state.deployments.close()  # the keep-alive connections to deployments
            state.db.dispose()

    app = _App(
        title="openweights",
        version=VERSION,
        description="Fine-tune, evaluate and serve open-weight LLMs as jobs.",
        lifespan=lifespan,
    )
    app.state.ow = state
    from openweights.server.limits import BodyLimitMiddleware

    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(RequestIdMiddleware)
    from openweights.server.fast import FastPath

    # workers' claim/heartbeat/complete and job creation (fast.py), in front of the stack above
    app.fast = FastPath(
        lambda scope, receive, send: FastAPI.__call__(app, scope, receive, send), state
    )

    @app.exception_handler(StoreError)
    async def store_error(_request: Request, exc: StoreError):
        return _error(exc.status_code, exc.type, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        errs = exc.errors()
        parts = []
        for e in errs[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        first = errs[0].get("loc", ()) if errs else ()
        param = ".".join(str(x) for x in first if x not in ("body", "query", "path")) or None
        return _error(422, "invalid_request", "Invalid request: " + "; ".join(parts), param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = {k.lower(): v for k, v in (getattr(exc, "headers", None) or {}).items()}
        if exc.status_code == 405:  # FastAPI has a route per method: list them all in Allow
            from starlette.routing import Match

            methods: set[str] = set()
            for route in request.app.router.routes:
                if route.matches(request.scope)[0] != Match.NONE and getattr(
                    route, "methods", None
                ):
                    methods |= route.methods
            headers["allow"] = ", ".join(sorted(methods))
        return _error(exc.status_code, "http_error", str(exc.detail), headers=headers or None)

    @app.exception_handler(Exception)
    async def unhandled(_request: Request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return _error(500, "server_error", "Internal server error.")

    @app.get("/health", tags=["meta"])
    async def health() -> dict:
        return {"status": "ok", "version": VERSION}

    from openweights.server.routes import batches, files, jobs, models, orgs, runs

    for module in (orgs, files, jobs, runs, models, batches):
        app.include_router(module.router)
    from openweights.server.routes import openai as openai_routes

    app.include_router(openai_routes.router)  # OpenAI wire API, routed to deployments
    from openweights.server.routes import cluster as cluster_routes

    app.include_router(cluster_routes.router)
    from openweights.server import dashboard  # web UI at /dashboard/ (not in the OpenAPI schema)

    dashboard.install(app)

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An openweights API key (`ow_…`).",
                }
            }
            public = {"/health", "/v1/signup"}
            for path, ops in schema["paths"].items():
                for op in ops.values():
                    if path not in public:
                        op["security"] = [{"bearer": []}]
                    else:
                        op["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8124,
    settings: Settings | None = None,
    log_level: str = "info",
) -> None:
    """Run the server in this process (blocking)."""
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=3,
    )
