"""File metadata. The bytes live in the blob store under their sha256."""

from __future__ import annotations

from sqlalchemy import Connection, insert, select

from openweights.store import schema as s
from openweights.store.errors import NotFound
from openweights.store.queries import query


def file_id(purpose: str, sha256: str) -> str:
    """Same bytes and purpose → same id: uploading twice stores once."""
    return f"{purpose}:file-{sha256[:12]}"


def add_file(
    conn: Connection,
    *,
    org_id: str,
    purpose: str,
    filename: str,
    size: int,
    sha256: str,
    now: float,
) -> dict:
    fid = file_id(purpose, sha256)
    existing = _get(conn, org_id, fid)
    if existing is not None:
        return existing
    row = {
        "org_id": org_id,
        "id": fid,
        "filename": filename,
        "purpose": purpose,
        "bytes": size,
        "sha256": sha256,
        "created_at": now,
    }
    conn.execute(insert(s.files), row)
    return row


def add_file_once(
    conn: Connection,
    *,
    org_id: str,
    purpose: str,
    filename: str,
    size: int,
    sha256: str,
    now: float,
) -> str:
    """`add_file` in one statement, for callers that need only the id (a run's log file)."""
    fid = file_id(purpose, sha256)
    conn.execute(
        query(conn, "add_file_once"),
        {
            "org_id": org_id,
            "id": fid,
            "filename": filename,
            "purpose": purpose,
            "bytes": size,
            "sha256": sha256,
            "now": now,
        },
    )
    return fid


def _get(conn: Connection, org_id: str, fid: str) -> dict | None:
    row = (
        conn.execute(select(s.files).where(s.files.c.org_id == org_id, s.files.c.id == fid))
        .mappings()
        .first()
    )
    return dict(row) if row else None


def get_file(conn: Connection, org_id: str, fid: str) -> dict:
    row = _get(conn, org_id, fid)
    if row is None:
        raise NotFound(f"File {fid!r} not found.", param="file_id")
    return row


def list_files(
    conn: Connection, org_id: str, *, purpose: str | None, limit: int, after: str | None
) -> tuple[list[dict], bool]:
    q = select(s.files).where(s.files.c.org_id == org_id)
    if purpose:
        q = q.where(s.files.c.purpose == purpose)
    if after:
        anchor = _get(conn, org_id, after)
        if anchor is None:
            raise NotFound(f"File {after!r} not found.", param="after")
        q = q.where(
            (s.files.c.created_at < anchor["created_at"])
            | ((s.files.c.created_at == anchor["created_at"]) & (s.files.c.id < after))
        )
    q = q.order_by(s.files.c.created_at.desc(), s.files.c.id.desc()).limit(limit + 1)
    rows = [dict(r) for r in conn.execute(q).mappings()]
    return rows[:limit], len(rows) > limit


def missing_files(conn: Connection, org_id: str, ids: list[str]) -> list[str]:
    found: set[str] = set()
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        q = select(s.files.c.id).where(s.files.c.org_id == org_id, s.files.c.id.in_(chunk))
        found.update(r[0] for r in conn.execute(q))
    return [i for i in ids if i not in found]
