"""Read-only queries the dashboard needs beyond the API's store functions (search, facets,
metric series). They read the store's tables and never write."""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    Connection,
    Float,
    Integer,
    String,
    and_,
    case,
    cast,
    func,
    literal,
    or_,
    select,
)

from openweights.store import jobs as q
from openweights.store import schema as s

J, R, E, W = s.jobs, s.runs, s.events, s.workers

#: The fields that name a series of a metric (one line per value, never merged).
SERIES_LABELS = ("dataset", "tag")
#: Numeric fields that are not metrics.
NOT_METRICS = {"step", "total_steps", "n_tokens"}
#: Events with one of these fields describe one data row (e.g. the logprob callback's per-row
#: `logp`): plotted through their per-tag means (`logp_mean`) instead, one line per tag.
ROW_FIELDS = ("row",)


def search_jobs(
    conn: Connection,
    org_id: str,
    *,
    status: str | None,
    type: str | None,
    model: str | None,
    text: str | None,
    limit: int,
    after: str | None,
) -> tuple[list[dict], bool, int]:
    """Jobs newest first, filtered; (page, has_more, total matching)."""
    where = [J.c.org_id == org_id]
    if status:
        where.append(J.c.status == status)
    if type:
        where.append(J.c.type == type)
    if model:
        where.append(J.c.model.contains(model, autoescape=True))
    if text:
        where.append(
            or_(
                J.c.id.contains(text, autoescape=True),
                cast(J.c.params, String).contains(text, autoescape=True),
            )
        )
    total = conn.execute(select(func.count()).select_from(J).where(*where)).scalar_one()
    qry = select(J).where(*where)
    if after:
        anchor = q.get_job(conn, org_id, after)
        qry = qry.where(
            or_(
                J.c.created_at < anchor["created_at"],
                and_(J.c.created_at == anchor["created_at"], J.c.pk < anchor["pk"]),
            )
        )
    qry = qry.order_by(J.c.created_at.desc(), J.c.pk.desc()).limit(limit + 1)
    rows = [dict(r) for r in conn.execute(qry).mappings()]
    return rows[:limit], len(rows) > limit, total


def job_facets(conn: Connection, org_id: str) -> dict[str, list]:
    """Distinct types and status counts of the org's jobs (for the filter controls)."""
    types = [
        r[0]
        for r in conn.execute(
            select(J.c.type).where(J.c.org_id == org_id).group_by(J.c.type).order_by(J.c.type)
        )
    ]
    counts = dict(
        conn.execute(
            select(J.c.status, func.count()).where(J.c.org_id == org_id).group_by(J.c.status)
        ).all()
    )
    return {"types": types, "status_counts": counts}


def _event_type():
    return E.c.data["type"].as_string()


def job_events(
    conn: Connection,
    org_id: str,
    job_pk: int,
    *,
    run_id: int | None,
    type: str | None,
    after: int | None,
    limit: int,
) -> tuple[list[dict], bool]:
    qry = select(E).where(E.c.org_id == org_id, E.c.job_pk == job_pk)
    if run_id is not None:
        qry = qry.where(E.c.run_id == run_id)
    if type == "(none)":
        qry = qry.where(_event_type().is_(None))
    elif type:
        qry = qry.where(_event_type() == type)
    if after is not None:
        qry = qry.where(E.c.id > after)
    rows = [dict(r) for r in conn.execute(qry.order_by(E.c.id).limit(limit + 1)).mappings()]
    return rows[:limit], len(rows) > limit


class EventIndex:
    """What the job pages need to know about all of a job's events — their count, their types,
    the events that name a file (samples, token log-prob files) — kept per (org, job) and
    brought up to date by reading only the events after the last one seen (events are
    append-only). A 100k-event run costs one full scan per server process, not one per page."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, conn: Connection, org_id: str, job_pk: int) -> dict:
        key = (org_id, job_pk)
        with self._lock:
            entry = self._entries.pop(key, None) or {
                "last": 0,
                "count": 0,
                "types": set(),
                "files": [],
            }
            t, prev = _event_type(), entry["last"]
            for typ, n, top in conn.execute(
                select(t, func.count(), func.max(E.c.id))
                .where(E.c.org_id == org_id, E.c.job_pk == job_pk, E.c.id > prev)
                .group_by(t)
            ):
                entry["types"].add(typ if typ is not None else "(none)")
                entry["count"] += n
                entry["last"] = max(entry["last"], top)
            if entry["last"] > prev:  # (an event written between the two reads waits for the next)
                entry["files"] += [
                    tuple(r)
                    for r in iter_file_events(conn, org_id, job_pk, after=prev)
                    if r[0] <= entry["last"]
                ]
            self._entries[key] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            return {
                "count": entry["count"],
                "types": sorted(entry["types"]),
                "files": list(entry["files"]),
            }


EVENTS = EventIndex()


def event_types(
    conn: Connection, org_id: str, job_pk: int, index: EventIndex = EVENTS
) -> list[str]:
    """The distinct `type` fields of a job's events (`(none)` for events without one)."""
    return index.get(conn, org_id, job_pk)["types"]


def count_events(conn: Connection, org_id: str, job_pk: int) -> int:
    """One indexed range count (the job page needs no more, so it never waits on a full scan)."""
    return conn.execute(
        select(func.count()).select_from(E).where(E.c.org_id == org_id, E.c.job_pk == job_pk)
    ).scalar_one()


def iter_event_data(conn: Connection, org_id: str, job_pk: int, run_id: int | None, after: int):
    qry = select(E.c.id, E.c.run_id, E.c.data, E.c.file).where(
        E.c.org_id == org_id, E.c.job_pk == job_pk, E.c.id > after
    )
    if run_id is not None:
        qry = qry.where(E.c.run_id == run_id)
    return conn.execute(qry.order_by(E.c.id).execution_options(yield_per=5000))


try:  # the `fast` extra: a cold read of a 100k-event run parses 3-4x faster
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - orjson is optional
    from json import loads as _loads


def iter_metric_rows(conn: Connection, org_id: str, job_pk: int, run_id: int | None, after: int):
    """(id, data) of the events after `after` that can hold a metric (they name a `step`): the
    JSON text is read raw and parsed here only when it mentions a step, which skips most of
    what a logprob-tracking run writes without paying for the database's own JSON functions."""
    qry = select(E.c.id, cast(E.c.data, String)).where(
        E.c.org_id == org_id, E.c.job_pk == job_pk, E.c.id > after
    )
    if run_id is not None:
        qry = qry.where(E.c.run_id == run_id)
    for eid, text in conn.execute(qry.order_by(E.c.id).execution_options(yield_per=5000)):
        if text is None or '"step"' not in text:
            yield eid, None
            continue
        try:
            yield eid, _loads(text)
        except ValueError:
            yield eid, None


def series_key(metric: str, data: dict) -> str:
    labels = [f"{k}={data[k]}" for k in SERIES_LABELS if isinstance(data.get(k), str)]
    return metric + (f" [{', '.join(labels)}]" if labels else "")


def metric_points(data: dict) -> list[tuple[str, str, float, float]]:
    """(metric, series, step, value) for each numeric field of an event that has a step."""
    step = data.get("step")
    if step is None or type(step) not in (int, float):
        return []
    if any(k in data for k in ROW_FIELDS):
        return []
    labels = [f"{k}={data[k]}" for k in SERIES_LABELS if isinstance(data.get(k), str)]
    suffix = f" [{', '.join(labels)}]" if labels else ""
    out = []
    for k, v in data.items():
        if type(v) not in (int, float) or k in NOT_METRICS or not math.isfinite(v):
            continue
        out.append((k, k + suffix, float(step), float(v)))
    return out


def downsample(xs: list[float], ys: list[float], n: int) -> tuple[list[float], list[float]]:
    """At most `n` points: bucket means, keeping the first and last point as they are."""
    if len(xs) <= n:
        return xs, ys
    size = len(xs) / (n - 2)
    ox, oy = [xs[0]], [ys[0]]
    for b in range(n - 2):
        lo, hi = int(b * size) + 1, min(int((b + 1) * size) + 1, len(xs) - 1)
        if hi <= lo:
            continue
        ox.append(sum(xs[lo:hi]) / (hi - lo))
        oy.append(sum(ys[lo:hi]) / (hi - lo))
    ox.append(xs[-1])
    oy.append(ys[-1])
    return ox, oy


class SeriesCache:
    """Metric series already read, per (org, job, run): a page load reads only the events that
    came after the last one it saw (events are append-only), so a plot of a 100k-event run
    costs one full read per server process, not one per load."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[int, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def series(self, conn: Connection, org_id: str, job_pk: int, run_id: int | None):
        key = (org_id, job_pk, run_id)
        with self._lock:  # one reader per process at a time: the entry is updated in place
            last, acc = self._entries.pop(key, (0, {}))
            for eid, data in iter_metric_rows(conn, org_id, job_pk, run_id, last):
                last = eid
                if not isinstance(data, dict):
                    continue
                for metric, skey, step, value in metric_points(data):
                    per = acc.get(metric)
                    if per is None:
                        per = acc[metric] = {}
                    xy = per.get(skey)
                    if xy is None:
                        xy = per[skey] = ([], [])
                    xy[0].append(step)
                    xy[1].append(value)
            self._entries[key] = (last, acc)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            return last, {
                m: {k: (list(x), list(y)) for k, (x, y) in per.items()} for m, per in acc.items()
            }


SERIES = SeriesCache()


def metrics(
    conn: Connection,
    org_id: str,
    job_pk: int,
    run_id: int | None,
    max_points: int = 2000,
    cache: SeriesCache = SERIES,
) -> dict[str, Any]:
    """{"metrics": {metric: {series: [[steps], [values]]}}, "last_id": n}, downsampled."""
    last, acc = cache.series(conn, org_id, job_pk, run_id)
    out: dict[str, dict[str, list]] = {}
    for metric in sorted(acc):
        out[metric] = {}
        for key, (xs, ys) in sorted(acc[metric].items()):
            if any(xs[i] > xs[i + 1] for i in range(len(xs) - 1)):
                order = sorted(range(len(xs)), key=xs.__getitem__)
                xs, ys = [xs[i] for i in order], [ys[i] for i in order]
            dx, dy = downsample(xs, ys, max_points)
            out[metric][key] = [dx, dy]
    return {"metrics": out, "last_id": last}


def iter_file_events(conn: Connection, org_id: str, job_pk: int, after: int = 0):
    """(id, run_id, data, file) of a job's events that name a file (in the `file` column or in
    the data): the filter runs in SQL, so a run with 100k metric events is not decoded here."""
    qry = (
        select(E.c.id, E.c.run_id, E.c.data, E.c.file)
        .where(
            E.c.org_id == org_id,
            E.c.job_pk == job_pk,
            E.c.id > after,
            or_(E.c.file.is_not(None), E.c.data["file"].as_string().is_not(None)),
        )
        .order_by(E.c.id)
    )
    return conn.execute(qry)


def sample_events(
    conn: Connection, org_id: str, job_pk: int, index: EventIndex = EVENTS
) -> dict[str, list[dict]]:
    """Sampling-callback events (`{tag, step, file}`) per tag, by step."""
    out: dict[str, list[dict]] = defaultdict(list)
    for eid, rid, data, file in index.get(conn, org_id, job_pk)["files"]:
        if not isinstance(data, dict):
            continue
        f = file or data.get("file")
        step = data.get("step")
        if not isinstance(f, str) or not isinstance(step, int | float) or isinstance(step, bool):
            continue
        tag = data.get("tag") if isinstance(data.get("tag"), str) else "samples"
        out[tag].append({"id": eid, "run_id": rid, "step": step, "file": f})
    for rows in out.values():
        rows.sort(key=lambda r: (r["step"], r["id"]))
    return dict(sorted(out.items()))


def worker_names(conn: Connection, org_id: str) -> dict[str, dict]:
    return {
        r["id"]: dict(r)
        for r in conn.execute(
            select(W.c.id, W.c.name, W.c.hardware_type, W.c.hardware, W.c.provider).where(
                W.c.org_id == org_id
            )
        ).mappings()
    }


def worker_runs(conn: Connection, org_id: str, worker_id: str, limit: int) -> list[dict]:
    """The runs a worker ran, newest first, with their job id (its logs are those runs' logs)."""
    qry = (
        select(R, J.c.id.label("job_id"), J.c.type.label("job_type"))
        .join(J, J.c.pk == R.c.job_pk)
        .where(R.c.org_id == org_id, R.c.worker_id == worker_id)
        .order_by(R.c.id.desc())
        .limit(limit)
    )
    return [dict(r) for r in conn.execute(qry).mappings()]


def runs_by_id(conn: Connection, org_id: str, run_ids: list[int]) -> dict[int, dict]:
    if not run_ids:
        return {}
    qry = (
        select(R.c.id, R.c.status, J.c.id.label("job_id"))
        .join(J, J.c.pk == R.c.job_pk)
        .where(R.c.org_id == org_id, R.c.id.in_(run_ids))
    )
    return {r["id"]: dict(r) for r in conn.execute(qry).mappings()}


def _utc_day(conn: Connection, seconds):
    """Whole UTC days since the epoch of a timestamp column (positive times)."""
    if conn.dialect.name == "postgresql":
        return func.floor(seconds / 86400)  # a float cast to integer rounds there
    return cast(seconds / 86400, Integer)  # SQLite truncates, = floor for positive times


def spend(
    conn: Connection,
    org_id: str,
    price_of: Callable[[str], float],
    *,
    now: float,
    top: int = 200,
) -> dict[str, Any]:
    """The org's spend, summed in SQL: total, per UTC day, and the `top` jobs by cost.

    A run costs its busy time × its pod's recorded price, else its hardware's hourly price
    (`price_of(hardware_type)`; local workers cost nothing), as `store.cluster.run_costs` prices
    each run; here the few hardware types are priced first and the sums run in the database, so
    100k runs cost one scan."""
    P = s.cluster_pods
    hw = func.coalesce(R.c.hardware, W.c.hardware_type)
    types = conn.execute(
        select(hw)
        .select_from(R)
        .outerjoin(W, W.c.id == R.c.worker_id)
        .where(R.c.org_id == org_id, or_(W.c.provider.is_(None), W.c.provider != "local"))
        .group_by(hw)
    ).all()
    prices = {t: price_of(t or "") for (t,) in types}
    price = case(
        # the price its pod was launched at, as the manager recorded it (`cluster_pods`)
        (P.c.price_per_hour.is_not(None), P.c.price_per_hour),
        (W.c.provider == "local", literal(0.0)),
        *[(hw == t, literal(p)) for t, p in prices.items() if p],
        else_=literal(0.0),
    )
    busy_s = func.coalesce(R.c.finished_at, literal(now)) - R.c.started_at
    busy_s = case((busy_s > 0, busy_s), else_=literal(0.0))
    usd = cast(busy_s, Float) * price / 3600.0
    base = (
        select()
        .select_from(R)
        .outerjoin(W, W.c.id == R.c.worker_id)
        .outerjoin(P, and_(P.c.org_id == R.c.org_id, P.c.name == W.c.name))
        .where(R.c.org_id == org_id)
    )
    total, n_runs, n_jobs = conn.execute(
        base.add_columns(
            func.coalesce(func.sum(usd), 0.0), func.count(), func.count(func.distinct(R.c.job_pk))
        )
    ).one()
    day = _utc_day(conn, R.c.started_at)
    days = conn.execute(
        base.add_columns(day.label("day"), func.sum(usd)).group_by(day).order_by(day.desc())
    ).all()
    cost, busy = func.sum(usd).label("usd"), func.sum(busy_s).label("busy_s")
    per_job = (
        base.add_columns(R.c.job_pk, cost, busy, func.max(hw).label("hw"))
        .group_by(R.c.job_pk)
        .order_by(cost.desc(), busy.desc(), R.c.job_pk.desc())
        .limit(top)
        .subquery()
    )
    jobs = conn.execute(
        select(J.c.id, per_job.c.usd, per_job.c.busy_s / 3600.0, per_job.c.hw)
        .join_from(per_job, J, J.c.pk == per_job.c.job_pk)
        .order_by(per_job.c.usd.desc(), per_job.c.busy_s.desc(), J.c.pk.desc())
    ).all()
    return {
        "total": float(total or 0.0),
        "runs": n_runs,
        "n_jobs": n_jobs,
        "days": [(int(d), float(v or 0.0)) for d, v in days],
        "jobs": [(j, float(v or 0.0), float(h or 0.0), hw or "?") for j, v, h, hw in jobs],
    }


def pending_groups(conn: Connection, org_id: str) -> list[dict]:
    """Pending jobs grouped by what they need (VRAM, hardware, image), oldest queued first."""
    qry = (
        select(
            J.c.requires_vram_gb,
            J.c.allowed_hardware,
            J.c.docker_image,
            func.count().label("n"),
            func.min(J.c.queued_at).label("oldest"),
        )
        .where(J.c.org_id == org_id, J.c.status == "pending")
        .group_by(J.c.requires_vram_gb, J.c.allowed_hardware, J.c.docker_image)
    )
    rows = [dict(r) for r in conn.execute(qry).mappings()]
    rows.sort(key=lambda r: r["oldest"])
    return rows


_LOGP_PATH = re.compile(r"(?:^|/)logp/([^/]+)/step-(\d+)\.jsonl$")


def logp_files(
    conn: Connection, org_id: str, job_pk: int, index: EventIndex = EVENTS
) -> dict[str, dict[int, str]]:
    """Token-level log-probability files of the logprob callback (uploaded as
    `logp/<dataset>/step-<n>.jsonl`): {dataset: {step: file id}} (the last run's file wins)."""
    out: dict[str, dict[int, str]] = defaultdict(dict)
    for _eid, _rid, data, file in index.get(conn, org_id, job_pk)["files"]:
        if not isinstance(data, dict) or not isinstance(data.get("path"), str):
            continue
        m = _LOGP_PATH.search(data["path"])
        f = file or data.get("file")
        if m and isinstance(f, str):
            out[m.group(1)][int(m.group(2))] = f
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}
