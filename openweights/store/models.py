"""The model registry: models that jobs produced, by name, per organization.

A job declares a model with one event `{"type": "model", "name": ..., "prefix": "uploads/model",
"kind": "full" | "adapter", "base_model": ...}`; when its run completes, the files the run uploaded
under `prefix` become the model's files (path under the model root → file id). A later job with the
same name replaces the entry, as a push to a hub repository would.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection

from openweights.store import schema as s
from openweights.store.errors import Invalid, NotFound

#: `org/name` with an optional `/subfolder` part, as Hub ids look.
NAME_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
KINDS = ("full", "adapter")


def _row(r: Any) -> dict:
    return dict(r._mapping)


def register_from_run(
    conn: Connection, org_id: str, job_id: str, run_id: int, now: float
) -> list[dict]:
    """Register the models a completed run declared; returns the entries written."""
    from openweights.store.queries import query

    declared = [
        data
        for (data,) in conn.execute(query(conn, "run_model_declarations"), {"run_id": run_id})
        if isinstance(data, dict)
    ]
    if not declared:  # most jobs: one indexed read on the completion path, nothing else
        return []
    ev = s.events
    uploaded: dict[str, str] = {}
    for data, file_id in conn.execute(
        select(ev.c.data, ev.c.file).where(ev.c.run_id == run_id).where(ev.c.file.is_not(None))
    ):
        path = data.get("path") if isinstance(data, dict) else None
        if isinstance(path, str):
            uploaded[path] = file_id
    written = []
    for decl in declared:
        name, prefix = decl.get("name"), str(decl.get("prefix") or "").strip("/")
        kind = decl.get("kind") or "full"
        if not isinstance(name, str) or not NAME_RE.match(name) or kind not in KINDS or not prefix:
            continue  # a malformed declaration registers nothing; the event itself stays visible
        files = {
            path[len(prefix) + 1 :]: fid
            for path, fid in uploaded.items()
            if path.startswith(prefix + "/")
        }
        if not files:
            continue
        written.append(
            put_model(
                conn,
                org_id,
                name,
                kind=kind,
                base_model=decl.get("base_model"),
                job_id=job_id,
                run_id=run_id,
                files=files,
                now=now,
            )
        )
    return written


def put_model(
    conn: Connection,
    org_id: str,
    name: str,
    *,
    kind: str,
    files: dict[str, str],
    now: float,
    base_model: str | None = None,
    job_id: str | None = None,
    run_id: int | None = None,
) -> dict:
    if not NAME_RE.match(name):
        raise Invalid(f"Model name {name!r} must look like 'org/name'.", param="name")
    f = s.files
    size = conn.execute(
        select(func.coalesce(func.sum(f.c.bytes), 0)).where(
            f.c.org_id == org_id, f.c.id.in_(sorted(set(files.values())))
        )
    ).scalar_one()
    values = {
        "kind": kind,
        "base_model": base_model,
        "job_id": job_id,
        "run_id": run_id,
        "files": files,
        "bytes": int(size),
        "updated_at": now,
    }
    m = s.models
    done = conn.execute(
        update(m).where(m.c.org_id == org_id, m.c.name == name).values(**values)
    ).rowcount
    if not done:
        conn.execute(insert(m).values(org_id=org_id, name=name, created_at=now, **values))
    return get_model(conn, org_id, name)


def get_model(conn: Connection, org_id: str, name: str) -> dict:
    m = s.models
    row = conn.execute(select(m).where(m.c.org_id == org_id, m.c.name == name)).first()
    if row is None:
        raise NotFound(f"No model {name!r} in this organization.", param="name")
    return _row(row)


def list_models(
    conn: Connection, org_id: str, *, limit: int = 100, base_model: str | None = None
) -> list[dict]:
    m = s.models
    q = select(m).where(m.c.org_id == org_id)
    if base_model is not None:
        q = q.where(m.c.base_model == base_model)
    q = q.order_by(m.c.updated_at.desc(), m.c.name).limit(limit)
    return [_row(r) for r in conn.execute(q)]


def delete_model(conn: Connection, org_id: str, name: str) -> dict:
    row = get_model(conn, org_id, name)
    m = s.models
    conn.execute(delete(m).where(m.c.org_id == org_id, m.c.name == name))
    return row


def checkpoints(files: dict[str, str]) -> list[str]:
    """`checkpoint-N` subfolders, in step order."""
    names = {p.split("/", 1)[0] for p in files if p.startswith("checkpoint-") and "/" in p}
    return sorted(names, key=lambda n: (len(n), n))
