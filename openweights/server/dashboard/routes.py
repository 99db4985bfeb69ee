"""Dashboard pages: server-rendered HTML (Jinja2 + htmx), live data over server-sent events.

Every page reads the store directly for the session's org (never over HTTP), so another org's
ids are simply not found (404), as in the API.
"""

from __future__ import annotations

import codecs
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from jinja2 import Environment, FileSystemLoader, select_autoescape

from openweights.server.dashboard import _render
from openweights.server.dashboard._session import (
    COOKIE,
    SESSION_TOKEN_NAME,
    SESSION_TTL_S,
    CSRFError,
    LoginRequired,
    Session,
    check_csrf,
    check_origin,
    csrf_for,
    current,
)
from openweights.server.env_cache import secrets_key
from openweights.server.notify import job_key, queue_key, run_key
from openweights.store import dashboard as dq
from openweights.store import files as fstore
from openweights.store import jobs as q
from openweights.store import orgs
from openweights.store.errors import Forbidden, NotFound, StoreError, Unauthorized

T = TypeVar("T")
HERE = Path(__file__).parent
PREFIX = "/dashboard"
PAGE_SIZE = 50
EVENTS_PAGE = 200
FILE_ROWS_PAGE = 20
STATUSES = ("pending", "in_progress", "completed", "failed", "canceled")

router = APIRouter(prefix=PREFIX, include_in_schema=False)
env = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(["html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)
env.filters.update(_render.FILTERS)
env.globals.update(
    prefix=PREFIX,
    statuses=STATUSES,
    prompt_of=_render.prompt_of,
    completion_of=_render.completion_of,
    heat=_render.heat,
)


class PageNotFound(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def render(request: Request, template: str, session: Session | None, status: int = 200, **ctx):
    html = env.get_template(template).render(request=request, session=session, **ctx)
    return HTMLResponse(html, status_code=status, headers={"cache-control": "no-store"})


async def db(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run store work off the loop; a missing object (or another org's) is a 404 page."""
    try:
        return await request.app.state.ow.call(fn, *args)
    except NotFound as e:
        raise PageNotFound(e.message) from e


def _read(request: Request, fn: Callable[[Any], T]) -> Callable[[], T]:
    state = request.app.state.ow

    def work() -> T:
        with state.db.read() as conn:
            return fn(conn)

    return work


def install(app) -> None:
    """Mount the dashboard on the server's app: pages, static files, error pages, `/` redirect."""
    from fastapi.staticfiles import StaticFiles

    app.include_router(router)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired):
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"hx-redirect": f"{PREFIX}/login"})
        if request.method != "GET" or request.url.path.endswith("/stream"):
            return HTMLResponse("Log in first.", status_code=401)
        query = urlencode({"next": exc.next_url, **({"reason": exc.reason} if exc.reason else {})})
        return RedirectResponse(f"{PREFIX}/login?{query}", status_code=303)

    async def session_or_none(request: Request) -> Session | None:
        try:  # an error page keeps the navigation when the browser is logged in
            return await current(request)
        except LoginRequired:
            return None

    @app.exception_handler(PageNotFound)
    async def not_found(request: Request, exc: PageNotFound):
        session = await session_or_none(request)
        return render(request, "error.html", session, 404, title="Not found", message=exc.message)

    @app.exception_handler(CSRFError)
    async def csrf_error(request: Request, exc: CSRFError):
        session = await session_or_none(request)
        return render(request, "error.html", session, 403, title="Forbidden", message=str(exc))


def _partial(request: Request) -> bool:
    """An htmx swap asks for a fragment; a history restore (back button) needs the whole page."""
    h = request.headers
    return bool(h.get("hx-request")) and not h.get("hx-history-restore-request")


def _num(raw: str, kind: type) -> Any:
    """An optional number from a form's query string ("" from an empty select: none)."""
    try:
        return kind(raw) if raw.strip() else None
    except ValueError:
        return None


def _go(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _safe_next(url: str | None) -> str:
    if url and url.startswith(f"{PREFIX}/") and not url.startswith("//"):
        return url
    return f"{PREFIX}/jobs"


def _set_session(resp: Response, request: Request, secret: str) -> None:
    resp.set_cookie(
        COOKIE,
        secret,
        max_age=int(SESSION_TTL_S),
        path=PREFIX,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


def _new_session(conn, state, org_id: str) -> str:
    now = state.db.now(conn)
    _row, secret = orgs.create_token(
        conn,
        org_id=org_id,
        name=SESSION_TOKEN_NAME,
        kind="user",
        now=now,
        expires_at=now + SESSION_TTL_S,
    )
    return secret


# -- auth ------------------------------------------------------------------------------------


@router.get("/")
async def home(request: Request):
    return _go(f"{PREFIX}/jobs")


@router.get("/login")
async def login_page(request: Request, next: str = "", reason: str = ""):
    state = request.app.state.ow
    return render(
        request,
        "login.html",
        None,
        next=_safe_next(next),
        error=reason,
        allow_signup=state.settings.allow_signup,
    )


@router.post("/login")
async def login(request: Request):
    check_origin(request)
    form = await request.form()
    key = str(form.get("api_key") or "").strip()
    next_url = _safe_next(str(form.get("next") or ""))
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            p, _exp = orgs.authenticate(conn, key, state.db.now(conn))
            if p.kind != "user":
                raise Forbidden(f"A {p.kind} token cannot log in; use a user API key.")
            return _new_session(conn, state, p.org_id)

    try:
        if not key:
            raise Unauthorized("Paste an API key (`ow_…`).")
        secret = await state.call(work)
    except (Unauthorized, Forbidden) as e:
        return render(
            request,
            "login.html",
            None,
            401,
            next=next_url,
            error=e.message,
            allow_signup=state.settings.allow_signup,
        )
    resp = _go(next_url)
    _set_session(resp, request, secret)
    return resp


@router.post("/signup")
async def signup(request: Request):
    """A new org and its first API key (as `ow signup`), shown once; logs the browser in."""
    check_origin(request)
    state = request.app.state.ow
    form = await request.form()
    name = str(form.get("org_name") or "").strip()
    error = None
    if not state.settings.allow_signup:
        error = "Sign-up is disabled on this server; ask its operator for an API key."
    elif not name or len(name) > 200:
        error = "Give the organization a name (1 to 200 characters)."
    if error:
        return render(request, "login.html", None, 400, next="", error=error, allow_signup=True)

    def work():
        with state.db.write() as conn:
            now = state.db.now(conn)
            org = orgs.create_org(conn, name, now)
            _row, key = orgs.create_token(
                conn, org_id=org["id"], name="admin", kind="user", now=now
            )
            return org, key, _new_session(conn, state, org["id"])

    org, key, secret = await state.call(work)
    session = Session(
        principal=orgs.Principal(org_id=org["id"], token_id="", kind="user"),
        org_id=org["id"],
        org_name=org["name"],
        csrf=csrf_for(secret),
        expires_at=None,
    )
    resp = render(
        request, "signed_up.html", session, org=org, api_key=key, url=str(request.base_url)
    )
    _set_session(resp, request, secret)
    return resp


@router.post("/logout")
async def logout(request: Request, session: Session = Depends(current)):
    await check_csrf(request, session)
    state = request.app.state.ow
    key = f"auth:token:{session.principal.token_id}"

    def work():
        with state.db.write() as conn:
            orgs.revoke_token(conn, session.org_id, session.principal.token_id, state.db.now(conn))
            state.publish(conn, key)
        state.committed(key)

    await state.call(work)
    resp = _go(f"{PREFIX}/login?reason=Logged+out.")
    resp.delete_cookie(COOKIE, path=PREFIX)
    return resp


# -- jobs ------------------------------------------------------------------------------------


@router.get("/jobs")
async def jobs_page(
    request: Request,
    status: str = "",
    type: str = "",
    model: str = "",
    q_: str = Query(default="", alias="q", max_length=200),
    after: str = "",
    session: Session = Depends(current),
):
    status = status if status in STATUSES else ""

    def work(conn):
        rows, more, total = dq.search_jobs(
            conn,
            session.org_id,
            status=status or None,
            type=type or None,
            model=model or None,
            text=q_ or None,
            limit=PAGE_SIZE,
            after=after or None,
        )
        return rows, more, total, dq.job_facets(conn, session.org_id)

    rows, more, total, facets = await db(request, _read(request, work))
    filters = {"status": status, "type": type, "model": model, "q": q_}
    kept = {k: v for k, v in filters.items() if v}
    next_url = (
        f"{PREFIX}/jobs?" + urlencode({**kept, "after": rows[-1]["id"]}) if more and rows else None
    )
    first_url = f"{PREFIX}/jobs?" + urlencode(kept) if after else None
    ctx = dict(
        jobs=rows,
        total=total,
        filters=filters,
        facets=facets,
        next_url=next_url,
        first_url=first_url,
        compare_url=f"{PREFIX}/compare",
    )
    template = "jobs_table.html" if _partial(request) else "jobs.html"
    return render(request, template, session, **ctx)


def _job_context(conn, state, org_id: str, job_id: str) -> dict:
    job = q.get_job(conn, org_id, job_id)
    reason = None
    if job["status"] == "pending":
        reason = q.pending_reason(conn, job, state.db.now(conn), state.settings.worker_offline_s)
    runs = q.list_runs(conn, org_id, job_id)
    workers = dq.worker_names(conn, org_id)
    return {"job": job, "pending_reason": reason, "runs": runs, "workers": workers}


@functools.lru_cache(maxsize=256)  # a handful of hardware types; asked once per run
def _price_of(hardware_type: str) -> float:
    from openweights.cluster.catalog import DEFAULT_CATALOG

    offer = DEFAULT_CATALOG.offer(hardware_type) if hardware_type else None
    return offer.price_per_hour if offer is not None else 0.0


def _run_costs(conn, state, org_id: str, job_id: str | None = None) -> dict[int, dict]:
    """Cost of each run (busy time × its hardware's hourly price), by run id."""
    from openweights.store import cluster as cq

    rows = cq.run_costs(conn, org_id, _price_of, job_id=job_id, now=state.db.now(conn))
    return {r["run_id"]: r for r in rows}


@router.get("/jobs/{job_id}")
async def job_page(request: Request, job_id: str, session: Session = Depends(current)):
    state = request.app.state.ow

    def work(conn):
        ctx = _job_context(conn, state, session.org_id, job_id)
        ctx["n_events"] = dq.count_events(conn, session.org_id, ctx["job"]["pk"])
        ctx["costs"] = _run_costs(conn, state, session.org_id, job_id)
        return ctx

    ctx = await db(request, _read(request, work))
    ctx["history"] = _render.status_history(ctx["job"], ctx["runs"])
    ctx["snippet"] = _render.python_snippet(ctx["job"])
    if _partial(request):
        # 286 tells htmx to stop polling: a finished job changes no more
        done = ctx["job"]["status"] in q.TERMINAL
        return render(request, "job_status.html", session, 286 if done else 200, **ctx)
    return render(request, "job.html", session, tab="overview", **ctx)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str, session: Session = Depends(current)):
    await check_csrf(request, session)
    state = request.app.state.ow
    org = session.org_id

    def work():
        with state.db.write() as conn:
            row = q.cancel_job(conn, org, job_id, state.db.now(conn))
            keys = [job_key(org, job_id)] + (
                [run_key(row["current_run_id"])] if row["current_run_id"] else []
            )
            state.publish(conn, *keys)
            return keys

    return await _act(request, work, job_id)


@router.post("/jobs/{job_id}/restart")
async def restart_job(request: Request, job_id: str, session: Session = Depends(current)):
    await check_csrf(request, session)
    state = request.app.state.ow
    org = session.org_id

    def work():
        with state.db.write() as conn:
            q.restart_job(conn, org, job_id, state.db.now(conn))
            keys = [queue_key(org), job_key(org, job_id)]
            state.publish(conn, *keys)
            return keys

    return await _act(request, work, job_id)


async def _act(request: Request, work: Callable[[], list[str]], job_id: str):
    state = request.app.state.ow
    try:
        keys = await db(request, work)
    except StoreError as e:  # e.g. canceling a finished job: say why on the page
        return _go(f"{PREFIX}/jobs/{job_id}?" + urlencode({"error": e.message}))
    state.notifier.notify(*keys)
    return _go(f"{PREFIX}/jobs/{job_id}")


# -- logs ------------------------------------------------------------------------------------


def _pick_run(runs: list[dict], run: int | None) -> dict | None:
    if run is not None:
        for r in runs:
            if r["id"] == run:
                return r
        raise PageNotFound(f"Run {run} is not a run of this job.")
    return runs[-1] if runs else None


@router.get("/jobs/{job_id}/logs")
async def logs_page(
    request: Request, job_id: str, run: int | None = None, session: Session = Depends(current)
):
    state = request.app.state.ow
    ctx = await db(
        request, _read(request, lambda c: _job_context(c, state, session.org_id, job_id))
    )
    ctx["run"] = _pick_run(ctx["runs"], run)
    return render(request, "job_logs.html", session, tab="logs", **ctx)


def _log_loader(state, org_id: str, run_id: int):
    def load(off: int):
        with state.db.read() as conn:
            r = q.get_run(conn, org_id, run_id)
            if r["log_file"]:
                return r, None, fstore.get_file(conn, org_id, r["log_file"])
            return r, q.read_log_chunks(conn, run_id, off), None

    return load


def _sse(event: str, data: Any, id: int | None = None) -> bytes:
    head = f"id: {id}\n" if id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


@router.get("/runs/{run_id}/log/stream")
async def log_stream(
    request: Request,
    run_id: int,
    offset: int = Query(default=0, ge=0),
    session: Session = Depends(current),
):
    """The run's log as server-sent events (`chunk` {offset, text}), live until the run ends
    (`end`). A reconnect resumes at `Last-Event-ID` (the byte offset reached)."""
    state = request.app.state.ow
    last = request.headers.get("last-event-id")
    if last and last.isdigit():
        offset = max(offset, int(last))
    load = _log_loader(state, session.org_id, run_id)
    first = await db(request, load, offset)

    async def body():
        nonlocal offset
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        r, chunks, f = first
        yield b"retry: 2000\n\n"
        while True:
            if f is not None:
                if offset < f["bytes"]:
                    for chunk in state.blobs.iter_bytes(f["sha256"], offset):
                        offset += len(chunk)
                        yield _sse("chunk", {"text": decoder.decode(chunk)}, offset)
                yield _sse("end", {"status": r["status"]})
                return
            for off, data in chunks:
                offset = off + len(data)
                yield _sse("chunk", {"text": decoder.decode(data)}, offset)
            if await request.is_disconnected():
                return
            ev = state.notifier.event(f"log:{run_id}")
            ev_run = state.notifier.event(run_key(run_id))
            r, chunks, f = await state.call(load, offset)
            if chunks or f is not None:
                continue
            if r["status"] != "in_progress":
                yield _sse("end", {"status": r["status"]})
                return
            await state.notifier.wait_any([ev, ev_run], 10.0)
            if await request.is_disconnected():
                return
            r, chunks, f = await state.call(load, offset)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"cache-control": "no-store", "x-accel-buffering": "no"},
    )


@router.get("/runs/{run_id}/log.txt")
async def log_download(request: Request, run_id: int, session: Session = Depends(current)):
    state = request.app.state.ow
    r, chunks, f = await db(request, _log_loader(state, session.org_id, run_id), 0)
    headers = {"content-disposition": f'attachment; filename="run-{run_id}.log"'}
    if f is not None:
        return StreamingResponse(
            state.blobs.iter_bytes(f["sha256"]), media_type="text/plain", headers=headers
        )
    return Response(b"".join(d for _o, d in chunks), media_type="text/plain", headers=headers)


# -- events ----------------------------------------------------------------------------------


@router.get("/jobs/{job_id}/events")
async def events_page(
    request: Request,
    job_id: str,
    type: str = "",
    run_: str = Query(default="", alias="run"),
    after: int | None = None,
    session: Session = Depends(current),
):
    state = request.app.state.ow
    run = _num(run_, int)

    def work(conn):
        ctx = _job_context(conn, state, session.org_id, job_id)
        pk = ctx["job"]["pk"]
        rows, more = dq.job_events(
            conn, session.org_id, pk, run_id=run, type=type or None, after=after, limit=EVENTS_PAGE
        )
        ctx.update(events=rows, more=more, types=dq.event_types(conn, session.org_id, pk))
        return ctx

    ctx = await db(request, _read(request, work))
    kept = {k: v for k, v in {"type": type, "run": run}.items() if v}
    ctx["next_url"] = (
        f"{PREFIX}/jobs/{job_id}/events?" + urlencode({**kept, "after": ctx["events"][-1]["id"]})
        if ctx["more"]
        else None
    )
    ctx["first_url"] = f"{PREFIX}/jobs/{job_id}/events?" + urlencode(kept) if after else None
    ctx["filters"] = {"type": type, "run": run}
    return render(request, "job_events.html", session, tab="events", **ctx)


@router.get("/jobs/{job_id}/events/stream")
async def events_stream(
    request: Request,
    job_id: str,
    after: int = 0,
    run: int | None = None,
    session: Session = Depends(current),
):
    """New metric points of a job as server-sent events (`points`), until the job is finished."""
    state = request.app.state.ow
    org = session.org_id
    last = request.headers.get("last-event-id")
    if last and last.isdigit():
        after = max(after, int(last))
    job = await db(request, _read(request, lambda c: q.get_job(c, org, job_id)))

    def load(after_id: int):
        with state.db.read() as conn:
            j = q.get_job(conn, org, job_id)
            pts, last_id = [], after_id
            for eid, _rid, data, _f in dq.iter_event_data(conn, org, j["pk"], run, after_id):
                last_id = eid
                if isinstance(data, dict):
                    pts += [list(p) for p in dq.metric_points(data)]
                if len(pts) > 20000:
                    break
            return j, pts, last_id

    async def body():
        nonlocal after
        yield b"retry: 2000\n\n"
        j = job
        while True:
            run_now = j.get("current_run_id")
            keys = [job_key(org, job_id)] + ([f"events:{run_now}"] if run_now else [])
            evs = [state.notifier.event(k) for k in keys]
            j, pts, last_id = await state.call(load, after)
            if last_id > after:
                after = last_id
                yield _sse("points", pts, last_id)
            if j["status"] in q.TERMINAL:
                yield _sse("end", {"status": j["status"]})
                return
            if await request.is_disconnected():
                return
            if j.get("current_run_id") != run_now:
                continue  # a new run: listen for its events
            await state.notifier.wait_any(evs, 5.0)
            if await request.is_disconnected():
                return

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"cache-control": "no-store"}
    )


# -- plots -----------------------------------------------------------------------------------


@router.get("/jobs/{job_id}/plots")
async def plots_page(
    request: Request, job_id: str, run: int | None = None, session: Session = Depends(current)
):
    state = request.app.state.ow
    ctx = await db(
        request, _read(request, lambda c: _job_context(c, state, session.org_id, job_id))
    )
    ctx["run"] = _pick_run(ctx["runs"], run) if run is not None else None
    return render(request, "job_plots.html", session, tab="plots", **ctx)


@router.get("/jobs/{job_id}/metrics.json")
async def metrics_json(
    request: Request,
    job_id: str,
    run: int | None = None,
    max_points: int = Query(default=2000, ge=10, le=20000),
    session: Session = Depends(current),
):
    org = session.org_id

    def work(conn):
        j = q.get_job(conn, org, job_id)
        out = dq.metrics(conn, org, j["pk"], run, max_points)
        out["status"] = j["status"]
        return out

    return JSONResponse(await db(request, _read(request, work)))


@router.get("/compare")
async def compare_page(
    request: Request, jobs: list[str] = Query(default=[]), session: Session = Depends(current)
):
    ids = [j for j in dict.fromkeys(x.strip() for raw in jobs for x in raw.split(",")) if j]
    error = None
    if not 2 <= len(ids) <= 5:
        error = "Pick 2 to 5 jobs to compare (tick them in the jobs list)."
    org = session.org_id

    def work(conn):
        return [q.get_job(conn, org, j) for j in ids]

    rows = await db(request, _read(request, work)) if not error else []
    diff = _render.params_diff(rows) if rows else []
    return render(request, "compare.html", session, jobs=rows, diff=diff, error=error)


# -- samples ---------------------------------------------------------------------------------


@router.get("/jobs/{job_id}/samples")
async def samples_page(
    request: Request,
    job_id: str,
    tag: str = "",
    step_: str = Query(default="", alias="step"),
    compare_: str = Query(default="", alias="compare"),
    session: Session = Depends(current),
):
    step, compare = _num(step_, float), _num(compare_, float)
    state = request.app.state.ow
    org = session.org_id

    def work(conn):
        ctx = _job_context(conn, state, org, job_id)
        ctx["samples"] = dq.sample_events(conn, org, ctx["job"]["pk"])
        return ctx

    ctx = await db(request, _read(request, work))
    samples = ctx["samples"]
    tag = tag if tag in samples else next(iter(samples), "")
    events = samples.get(tag, [])
    steps = sorted({e["step"] for e in events})
    by_step = {e["step"]: e for e in events}  # the last event of a step wins (a retried run)
    cur = step if step in by_step else (steps[-1] if steps else None)
    other = compare if compare in by_step and compare != cur else None
    columns = []
    for s in [cur, other]:
        if s is None:
            continue
        rows = await _file_rows(request, org, by_step[s]["file"], 0, 200)
        columns.append({"step": s, "rows": rows["rows"], "file": by_step[s]["file"]})
    table = _render.sample_table(columns)
    ctx.update(tag=tag, steps=steps, step=cur, compare=other, columns=columns, table=table)
    return render(request, "job_samples.html", session, tab="samples", **ctx)


# -- files -----------------------------------------------------------------------------------


@router.get("/files")
async def files_page(
    request: Request, purpose: str = "", after: str = "", session: Session = Depends(current)
):
    org = session.org_id

    def work(conn):
        return fstore.list_files(
            conn, org, purpose=purpose or None, limit=PAGE_SIZE, after=after or None
        )

    rows, more = await db(request, _read(request, work))
    kept = {"purpose": purpose} if purpose else {}
    next_url = f"{PREFIX}/files?" + urlencode({**kept, "after": rows[-1]["id"]}) if more else None
    first_url = f"{PREFIX}/files?" + urlencode(kept) if after else None
    from openweights.types.files import PURPOSES

    return render(
        request,
        "files.html",
        session,
        files=rows,
        purpose=purpose,
        purposes=PURPOSES,
        next_url=next_url,
        first_url=first_url,
    )


async def _file_rows(request: Request, org: str, file_id: str, start: int, n: int) -> dict:
    """Rows `start..start+n` of a jsonl file (parsed), or its text head when it is not jsonl."""
    state = request.app.state.ow
    row = await db(request, _read(request, lambda c: fstore.get_file(c, org, file_id)))

    def read():
        rows: list[Any] = []
        text_head = b""
        buf = b""
        i = 0
        jsonl = True
        more = False
        for chunk in state.blobs.iter_bytes(row["sha256"]):
            if len(text_head) < 65536:
                text_head += chunk[: 65536 - len(text_head)]
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                if i >= start + n:
                    more = True
                    break
                if i >= start:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        jsonl = False
                i += 1
            if more or not jsonl:
                break
        if not more and jsonl and buf.strip() and i < start + n and i >= start:
            try:
                rows.append(json.loads(buf))
            except ValueError:
                jsonl = False
        return {
            "file": row,
            "rows": rows if jsonl else [],
            "jsonl": jsonl,
            "more": more,
            "text": None if jsonl else text_head.decode("utf-8", errors="replace"),
        }

    return await state.call(read)


@router.get("/files/{file_id}")
async def file_page(
    request: Request,
    file_id: str,
    page: int = Query(default=0, ge=0),
    session: Session = Depends(current),
):
    data = await _file_rows(request, session.org_id, file_id, page * FILE_ROWS_PAGE, FILE_ROWS_PAGE)
    kind = _render.row_kind(data["rows"])
    return render(
        request, "file.html", session, page=page, kind=kind, page_size=FILE_ROWS_PAGE, **data
    )


@router.get("/files/{file_id}/download")
async def file_download(request: Request, file_id: str, session: Session = Depends(current)):
    state = request.app.state.ow
    row = await db(request, _read(request, lambda c: fstore.get_file(c, session.org_id, file_id)))
    name = row["filename"].replace('"', "")
    return StreamingResponse(
        state.blobs.iter_bytes(row["sha256"]),
        media_type="application/octet-stream",
        headers={
            "content-disposition": f'attachment; filename="{name}"',
            "content-length": str(row["bytes"]),
        },
    )


# -- workers ---------------------------------------------------------------------------------


@router.get("/workers")
async def workers_page(request: Request, session: Session = Depends(current)):
    state = request.app.state.ow
    org = session.org_id

    def work(conn):
        rows = q.list_workers(conn, org)
        runs = dq.runs_by_id(conn, org, [r["current_run_id"] for r in rows if r["current_run_id"]])
        return rows, runs, state.db.now(conn)

    rows, runs, now = await db(request, _read(request, work))
    offline_s = state.settings.worker_offline_s
    for r in rows:
        if r["status"] == "active" and r["last_seen_at"] < now - offline_s:
            r["status"] = "offline"
        r["run"] = runs.get(r["current_run_id"])
    rows.sort(key=lambda r: (r["status"] != "active", -r["last_seen_at"]))
    return render(request, "workers.html", session, workers=rows, now=now)


WORKER_RUNS = 50


@router.get("/workers/{worker_id}")
async def worker_page(request: Request, worker_id: str, session: Session = Depends(current)):
    """One worker: hardware, cached models and the runs it ran (their logs are its job logs)."""
    state = request.app.state.ow
    org = session.org_id

    def work(conn):
        w = q.get_worker(conn, org, worker_id)
        return w, dq.worker_runs(conn, org, worker_id, WORKER_RUNS), state.db.now(conn)

    w, runs, now = await db(request, _read(request, work))
    if w["status"] == "active" and w["last_seen_at"] < now - state.settings.worker_offline_s:
        w["status"] = "offline"
    current_run = next((r for r in runs if r["id"] == w["current_run_id"]), None)
    return render(
        request, "worker.html", session, worker=w, runs=runs, current_run=current_run, now=now
    )


@router.post("/workers/{worker_id}/shutdown")
async def shutdown_worker(request: Request, worker_id: str, session: Session = Depends(current)):
    await check_csrf(request, session)
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            q.shutdown_worker(conn, session.org_id, worker_id, state.db.now(conn))

    await db(request, work)
    state.notifier.notify(f"worker:{worker_id}")
    return _go(f"{PREFIX}/workers")


# -- settings --------------------------------------------------------------------------------


async def _settings_ctx(request: Request, session: Session) -> dict:
    org = session.org_id

    def work(conn):
        return orgs.list_tokens(conn, org), orgs.list_secrets(conn, org), orgs.get_org(conn, org)

    tokens, secrets, org_row = await db(request, _read(request, work))
    return {"tokens": tokens, "secrets": secrets, "org": org_row, "now": time.time()}


@router.get("/settings")
async def settings_page(request: Request, error: str = "", session: Session = Depends(current)):
    ctx = await _settings_ctx(request, session)
    return render(request, "settings.html", session, error=error, **ctx)


@router.post("/settings/tokens")
async def create_token(request: Request, session: Session = Depends(current)):
    await check_csrf(request, session)
    state = request.app.state.ow
    form = await request.form()
    name = str(form.get("name") or "").strip()[:200] or "api key"
    kind = str(form.get("kind") or "user")
    days_raw = str(form.get("expires_in_days") or "").strip()
    if kind not in ("user", "worker") or (days_raw and not days_raw.isdigit()):
        return _go(
            f"{PREFIX}/settings?error=" + "kind+must+be+user+or+worker;+expiry+in+whole+days"
        )
    days = int(days_raw) if days_raw else None

    def work():
        with state.db.write() as conn:
            now = state.db.now(conn)
            exp = now + days * 86400 if days else None
            return orgs.create_token(
                conn, org_id=session.org_id, name=name, kind=kind, now=now, expires_at=exp
            )

    row, secret = await state.call(work)
    ctx = await _settings_ctx(request, session)
    return render(request, "settings.html", session, new_token=row, new_secret=secret, **ctx)


@router.post("/settings/tokens/{token_id}/revoke")
async def revoke_token(request: Request, token_id: str, session: Session = Depends(current)):
    await check_csrf(request, session)
    state = request.app.state.ow
    key = f"auth:token:{token_id}"

    def work():
        with state.db.write() as conn:
            orgs.revoke_token(conn, session.org_id, token_id, state.db.now(conn))
            state.publish(conn, key)
        state.committed(key)

    await db(request, work)
    return _go(f"{PREFIX}/settings")


@router.post("/settings/secrets")
async def set_secret(request: Request, session: Session = Depends(current)):
    """Write-only: the value goes in, only the name ever comes back."""
    import re

    from openweights.types.orgs import SECRET_NAME_PATTERN

    await check_csrf(request, session)
    state = request.app.state.ow
    form = await request.form()
    name = str(form.get("name") or "").strip()
    value = str(form.get("value") or "")
    if not re.match(SECRET_NAME_PATTERN, name):
        return _go(
            f"{PREFIX}/settings?"
            + urlencode(
                {"error": f"Secret name {name[:80]!r} is not an environment variable name."}
            )
        )
    key = secrets_key(session.org_id)

    def work():
        with state.db.write() as conn:
            orgs.set_secrets(conn, session.org_id, {name: value}, state.box, state.db.now(conn))
            state.publish(conn, key)
        state.committed(key)

    await state.call(work)
    return _go(f"{PREFIX}/settings")


@router.post("/settings/secrets/{name}/delete")
async def delete_secret(request: Request, name: str, session: Session = Depends(current)):
    await check_csrf(request, session)
    state = request.app.state.ow
    key = secrets_key(session.org_id)

    def work():
        with state.db.write() as conn:
            orgs.delete_secret(conn, session.org_id, name)
            state.publish(conn, key)
        state.committed(key)

    await db(request, work)
    return _go(f"{PREFIX}/settings")


# -- models, deployments, cost ---------------------------------------------------------------


@router.get("/models")
async def models_page(request: Request, session: Session = Depends(current)):
    from openweights.store import models as mstore

    def work(conn):
        rows = mstore.list_models(conn, session.org_id, limit=500)
        for r in rows:
            r["checkpoints"] = mstore.checkpoints(r["files"] or {})
        return rows

    rows = await db(request, _read(request, work))
    return render(request, "models.html", session, models=rows)


def _deployment_table(conn, org_id: str):
    from openweights.server.routes.openai import load_table

    return load_table(conn, org_id)


@router.get("/deployments")
async def deployments_page(request: Request, session: Session = Depends(current)):
    """`api` jobs: running ones with the models they serve (never their upstream URL or key)."""
    org = session.org_id

    def work(conn):
        rows, _more, _total = dq.search_jobs(
            conn, org, status=None, type="api", model=None, text=None, limit=100, after=None
        )
        table = _deployment_table(conn, org)
        return rows, table

    rows, table = await db(request, _read(request, work))
    serving: dict[str, list[str]] = {}
    for model, route in table.routes.items():
        serving.setdefault(route.job_id, []).append(model)
    deployments = []
    for j in rows:
        vp = (j["params"] or {}).get("validated_params") or {}
        deployments.append(
            {
                "job": j,
                "models": sorted(serving.get(j["id"], [])),
                "wanted": [vp.get("model"), *(vp.get("lora_adapters") or [])],
                "ready": j["id"] in serving,
            }
        )
    models = sorted(table.routes)
    return render(request, "deployments.html", session, deployments=deployments, models=models)


@router.post("/deployments/{job_id}/stop")
async def stop_deployment(request: Request, job_id: str, session: Session = Depends(current)):
    resp = await cancel_job(request, job_id, session)
    if resp.headers.get("location", "").endswith(f"/jobs/{job_id}"):
        return _go(f"{PREFIX}/deployments")
    return resp


@router.get("/playground")
async def playground_page(
    request: Request, model: list[str] = Query(default=[]), session: Session = Depends(current)
):
    table = await db(request, _read(request, lambda c: _deployment_table(c, session.org_id)))
    models = sorted(table.routes)
    chosen = [m for m in model if m][:2] or models[:1]
    return render(request, "playground.html", session, models=models, chosen=chosen)


@router.post("/playground/chat")
async def playground_chat(request: Request, session: Session = Depends(current)):
    """One chat completion from the org's deployment serving `model` (the API's own routing)."""
    from openweights.server.routes.openai import _forward

    await check_csrf(request, session)
    return await _forward(request, session.principal, "chat/completions")


@router.get("/cost")
async def cost_page(request: Request, session: Session = Depends(current)):
    """Spend per job, per day and in total (summed in SQL), billed pod time; the queue against
    live capacity."""
    from openweights.store import cluster as cq

    state = request.app.state.ow
    org = session.org_id

    def work(conn):
        now = state.db.now(conn)
        spent = dq.spend(conn, org, _price_of, now=now, top=200)
        pods = cq.list_pods(conn, org, now=now, limit=1000)
        workers = q.list_workers(conn, org)
        return spent, pods, workers, dq.pending_groups(conn, org), now

    spent, pods, workers, groups, now = await db(request, _read(request, work))
    billed_by_day: dict[int, float] = {}
    for pod in pods:  # pod time as the provider bills it: boot and idle time too
        d = int(pod["launched_at"] // 86400)
        billed_by_day[d] = billed_by_day.get(d, 0.0) + pod["cost_usd"]
    days = dict(spent["days"])
    live = [
        w
        for w in workers
        if w["status"] == "active" and w["last_seen_at"] >= now - state.settings.worker_offline_s
    ]
    for g in groups:
        fitting = [w for w in live if q.fits(g, w)]
        g["fitting"] = len(fitting)
        g["busy"] = sum(1 for w in fitting if w["current_run_id"])
    return render(
        request,
        "cost.html",
        session,
        total=spent["total"],
        by_job=spent["jobs"],
        n_jobs=spent["n_jobs"],
        by_day=[
            (_render.ts(d * 86400.0)[:10], days.get(d, 0.0), billed_by_day.get(d))
            for d in sorted(set(days) | set(billed_by_day), reverse=True)
        ],
        pods=pods,
        billed=sum(p["cost_usd"] for p in pods),
        running_pods=sum(1 for p in pods if p["terminated_at"] is None),
        groups=groups,
        live=live,
        runs=spent["runs"],
        now=now,
    )


# -- token heat-map --------------------------------------------------------------------------

HEATMAP_MAX_STEPS = 60
HEATMAP_MAX_TOKENS = 600


@router.get("/jobs/{job_id}/heatmap")
async def heatmap_page(
    request: Request,
    job_id: str,
    dataset: str = "",
    row: int = Query(default=0, ge=0),
    scale: str = "relative",
    session: Session = Depends(current),
):
    """Per-token log-probabilities of one row of a logprob-tracking dataset, one line per step.
    Colours span this row's own range (`relative`, so a small change shows) or −8…0 (`absolute`)."""
    state = request.app.state.ow
    org = session.org_id

    def work(conn):
        ctx = _job_context(conn, state, org, job_id)
        ctx["logp_files"] = dq.logp_files(conn, org, ctx["job"]["pk"])
        return ctx

    ctx = await db(request, _read(request, work))
    files = ctx["logp_files"]
    dataset = dataset if dataset in files else next(iter(files), "")
    steps = list(files.get(dataset, {}).items())[-HEATMAP_MAX_STEPS:]
    lines, n_rows = [], 0
    for step, fid in steps:
        data = await _file_rows(request, org, fid, row, 1)
        if not data["rows"]:
            continue
        r = data["rows"][0]
        tokens = ((r.get("logprobs") or {}).get("tokens") or [])[:HEATMAP_MAX_TOKENS]
        mean = (r.get("logprobs") or {}).get("mean")
        lines.append({"step": step, "tokens": tokens, "mean": mean})
    if steps:
        n_rows = await state.call(_count_lines, state, org, steps[-1][1])
    scale = scale if scale in ("relative", "absolute") else "relative"
    values = [
        t["logp"]
        for line in lines
        for t in line["tokens"]
        if isinstance(t.get("logp"), int | float)
    ]
    lo, hi = (min(values), max(values)) if values and scale == "relative" else (-8.0, 0.0)
    ctx.update(
        dataset=dataset,
        row=row,
        lines=lines,
        n_rows=n_rows,
        datasets=list(files),
        scale=scale,
        lo=lo,
        hi=hi,
        legend=[lo + (hi - lo) * i / 4 for i in range(5)],
    )
    return render(request, "job_heatmap.html", session, tab="heatmap", **ctx)


def _count_lines(state, org: str, file_id: str) -> int:
    with state.db.read() as conn:
        f = fstore.get_file(conn, org, file_id)
    n = 0
    for chunk in state.blobs.iter_bytes(f["sha256"]):
        n += chunk.count(b"\n")
    return n
