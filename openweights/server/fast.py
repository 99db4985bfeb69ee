"""The queue's hot routes without FastAPI's per-request machinery.

A worker's claim, heartbeat and completion, and a job's creation, are most of the server's
requests under load. For them, `FastPath` (plain ASGI, called by `app._App` before any of
FastAPI's own per-request work: its telemetry check and middleware stack) parses the JSON itself, takes the caller from the token cache, runs the same route code as the FastAPI
routes (`routes/runs.py`, `routes/jobs.py`) with the store on the driver's own connection
(`queries.RawDatabase`), and writes the answer with pydantic's serializer. Anything it does not
fully recognise — another content type, a query string, a body its checks refuse, a token not in
the cache, a body over 64 KiB — goes to the FastAPI route unchanged (the body replayed), so every
error answer stays the route's own, and the OpenAPI schema still lists these routes. What the
stack's `RequestIdMiddleware` does (an `x-request-id` on every answer, a JSON 500 naming it) it
does itself for the requests it answers.

On SQLite a short write transaction runs on the event loop itself when the write lock is free
(`wait=False`: no thread hop); when another connection holds the lock it runs in a thread that
waits for it. On PostgreSQL every transaction runs in a thread (the store code is synchronous).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import anyio.to_thread

from openweights.server.notify import Signal
from openweights.store import orgs
from openweights.store.db import Database
from openweights.store.errors import StoreError
from openweights.store.orgs import Principal
from openweights.store.queries import Busy, NotRaw, RawDatabase

try:  # the `fast` extra
    import orjson

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional
    import json

    _loads = json.loads

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BODY = 64 << 10
#: 20 digits in a row: maybe an integer beyond 64 bits, which orjson would read as a float (the
#: route's own parser keeps it exact)
_LONG_DIGITS = re.compile(rb"\d{20}")
CLOCK_REFRESH_S = 1.0
_JSON = b"application/json"


class Hot:
    """What the hot routes run their transactions on (one per server process)."""

    def __init__(self, db: Database, own_pids: set[int] | None = None) -> None:
        self.db = db
        self.raw = RawDatabase(db.url, own_pids)
        self.sqlite = self.raw.dialect == "sqlite"
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ow-hot")
        self._clock = (0.0, -CLOCK_REFRESH_S - 1.0)  # (database time, monotonic time then)

    async def run(self, fn: Callable[[Any], T], *, write: bool = True) -> T:
        """`fn(conn)` in one transaction (committed when it returns). `fn` uses the store's
        functions; where one of them runs a statement that is not a named one (`NotRaw`), the
        transaction is rolled back and run again on SQLAlchemy, in a thread."""
        if self.sqlite:
            try:
                return self.raw.run(fn, wait=False, write=write)
            except Busy:
                pass  # another writer holds the lock: wait for it in a thread
            except NotRaw:
                return await anyio.to_thread.run_sync(self._on_sqlalchemy, fn, write)
        return await self.in_thread(self.run_sync, fn, write)

    def now(self, conn: Any) -> float:
        """The database's clock (`Database.now`) without a round trip per transaction on
        PostgreSQL: read from the database at most once a second and advanced by this process's
        monotonic clock in between (drift: parts per million of that second)."""
        if self.sqlite:
            return time.time()  # what `Database.now` answers on SQLite
        m = time.monotonic()
        base, at = self._clock
        if m - at > CLOCK_REFRESH_S:
            base = self.db.now(conn)
            self._clock = (base, m)
            return base
        return base + (m - at)

    def fresh_now(self) -> float | None:
        """`now` without a connection: None when the clock is due to be read again."""
        base, at = self._clock
        m = time.monotonic()
        return base + (m - at) if m - at <= CLOCK_REFRESH_S else None

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on this pool's threads."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def run_sync(self, fn: Callable[[Any], T], write: bool = True) -> T:
        """`run` from a thread that may block."""
        try:
            return self.raw.run(fn, write=write)
        except NotRaw:
            return self._on_sqlalchemy(fn, write)

    def _on_sqlalchemy(self, fn: Callable[[Any], T], write: bool) -> T:
        with self.db.write() if write else self.db.read() as conn:
            return fn(conn)

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.raw.close()


def hot(state: Any) -> Hot:
    """The server's `Hot`, made on first use."""
    h = getattr(state, "hot", None)
    if h is None:
        h = state.hot = Hot(state.db, state.notifier.own_pids)
    return h


# -- the ASGI front --------------------------------------------------------------------------


class _Fallback(Exception):
    """Not a request the fast path answers: the FastAPI route does."""


def _number(body: dict, key: str, default: float, hi: float) -> float:
    v = body.get(key, default)
    if type(v) not in (int, float) or not (0 <= v <= hi) or math.isnan(v):
        raise _Fallback
    return float(v)


class FastPath:
    """ASGI app in front of the FastAPI stack (`app`): `POST /v1/jobs`, `POST /v1/workers/{id}/claim`,
    `POST /v1/runs/{id}/heartbeat` and `POST /v1/runs/{id}/complete`, answered without FastAPI
    when the request is well formed and its token is cached; every other request passes
    through untouched."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        route = check = None
        ident = ""
        if path == "/v1/jobs":
            route, check = self._create, _create_args
        elif path.startswith("/v1/workers/") and path.endswith("/claim"):
            ident = path[12:-6]
            if ident and "/" not in ident:
                route, check = self._claim, _claim_args
        elif path.startswith("/v1/runs/"):
            ident, _, action = path[9:].partition("/")
            if ident.isdigit() and ident.isascii() and len(ident) < 19:
                if action == "heartbeat":
                    route, check = self._heartbeat, _heartbeat_args
                elif action == "complete":
                    route, check = self._complete, _complete_args
        if route is None or check is None or scope.get("query_string"):
            return await self.app(scope, receive, send)

        p = auth = rid = None
        json_body = False
        length = -1
        for name, value in scope["headers"]:
            if name == b"authorization" and auth is None:  # the first, as Starlette reads it
                auth = value
                p = self._principal(value)
            elif name == b"content-type":
                json_body = value == _JSON or value.startswith(_JSON + b";")
            elif name == b"content-length":
                length = int(value) if value.isdigit() else MAX_BODY + 1
            elif name == b"x-request-id" and rid is None:
                rid = value
        if p is None or not json_body or length > MAX_BODY:
            return await self.app(scope, receive, send)

        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                return await self.app(scope, _replay(b"".join(chunks), receive, more=True), send)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            if _LONG_DIGITS.search(raw):  # orjson reads integers beyond 64 bits as floats
                raise _Fallback
            body = _loads(raw)
            if type(body) is not dict:
                raise _Fallback
            args = check(body)
        except (_Fallback, ValueError):  # the route answers it, with its own error if any
            return await self.app(scope, _replay(raw, receive), send)
        # What `app.RequestIdMiddleware` does for the other routes: the caller's request id (or
        # a new one) on the answer, and a JSON 500 naming it instead of a stack trace.
        rid = rid or uuid.uuid4().hex[:16].encode()
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"].append((b"x-request-id", rid))
            await send(message)

        try:
            await route(ident, args, p, receive, send_with_id)
        except StoreError as e:
            await _send_json(send_with_id, e.status_code, _error_json(e.type, e.message, e.param))
        except Exception:
            log.exception("unhandled error (request %s)", rid.decode("latin-1"))
            if started:
                raise
            msg = f"Internal server error (request {rid.decode('latin-1')})."
            await _send_json(send_with_id, 500, _error_json("server_error", msg, None))

    def _principal(self, header: bytes) -> Principal | None:
        scheme, _, secret = header.decode("latin-1").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return None
        return self.state.auth_cache.get(orgs.hash_token(secret), time.monotonic())

    async def _claim(self, ident: str, args: tuple, p: Principal, receive, send) -> None:
        from openweights.server.routes import runs

        wait_s, done = args
        gone = _Disconnect(receive)
        try:
            out = await runs.claim_loop(
                self.state, p, ident, wait_s, gone.check, gone.event, done=done
            )
        finally:
            gone.stop()
        if out is None:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        else:
            await _send_json(send, 200, out.__pydantic_serializer__.to_json(out))

    async def _create(self, ident: str, body: Any, p: Principal, receive, send) -> None:
        from openweights.server.routes import jobs

        out = await jobs.create(self.state, p, body)
        await _send_json(send, 200, out.__pydantic_serializer__.to_json(out))

    async def _heartbeat(self, ident: str, wait_s: float, p: Principal, receive, send) -> None:
        from openweights.server.routes import runs

        out = await runs.heartbeat_run(self.state, p, int(ident), wait_s)
        await _send_json(send, 200, out.__pydantic_serializer__.to_json(out))

    async def _complete(self, ident: str, args: tuple, p: Principal, receive, send) -> None:
        from openweights.server.routes import runs

        out = await runs.complete(self.state, p, int(ident), *args)
        await _send_json(send, 200, out.__pydantic_serializer__.to_json(out))


# What the fast path accepts of each body: exactly what the request model accepts (strict
# types, ranges); anything else raises _Fallback and the FastAPI route answers it.


def _create_args(body: dict) -> Any:
    from openweights import types as t

    return t.JobCreateParams.model_validate(body)  # a ValidationError is a ValueError


def _claim_args(body: dict) -> tuple[float, Any]:
    if body.keys() - {"wait_s", "done"}:
        raise _Fallback  # the model ignores extra keys: leave such a body to it
    done = body.get("done")
    if done is not None:
        from openweights import types as t

        if type(done) is not dict:
            raise _Fallback
        run_id = done.get("run_id")
        if type(run_id) is not int or not 1 <= run_id < 2**63:
            raise _Fallback
        rest = {k: v for k, v in done.items() if k != "run_id"}
        status, exit_code, error = _complete_args(rest)
        done = t.RunDone.model_construct(
            run_id=run_id, status=status, exit_code=exit_code, error=error
        )
    return _number(body, "wait_s", 30.0, 300), done


def _heartbeat_args(body: dict) -> float:
    if body.keys() - {"wait_s"}:
        raise _Fallback
    return _number(body, "wait_s", 10.0, 120)


def _complete_args(body: dict) -> tuple[str, int | None, str | None]:
    status = body.get("status")
    exit_code = body.get("exit_code")
    error = body.get("error")
    if (
        body.keys() - {"status", "exit_code", "error"}
        or status not in ("completed", "failed", "canceled", "lost")
        or (exit_code is not None and type(exit_code) is not int)
        or (exit_code is not None and not -(2**63) <= exit_code < 2**63)
        or (error is not None and (type(error) is not str or len(error) > 10_000))
    ):
        raise _Fallback
    return status, exit_code, error


class _Disconnect:
    """Notices a client that goes away while its request is parked (a long-poll)."""

    def __init__(self, receive) -> None:
        self._receive = receive
        self.event = Signal()
        self._task: asyncio.Task | None = None

    def watch(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._wait())

    async def _wait(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.event.set()
                return

    async def check(self) -> bool:
        self.watch()  # called before parking: from then on a disconnect sets the event
        return self.event.is_set()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _replay(body: bytes, receive, more: bool = False):
    """A `receive` that gives `body` first (read already), then the client's own messages."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replay


def _error_json(type_: str, message: str, param: str | None) -> bytes:
    from openweights.server.app import _error

    return bytes(_error(0, type_, message, param).body)


async def _send_json(send: Callable[[dict], Awaitable[None]], status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-length", str(len(body)).encode()),
                (b"content-type", b"application/json"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
