"""The model registry: `GET /v1/models`, `GET|DELETE /v1/models/{name}` (names contain a slash)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Query, Request

from openweights import types as t
from openweights.server.auth import principal, require
from openweights.server.routes._errors import ERROR_RESPONSES
from openweights.store import models as mstore
from openweights.store.orgs import Principal

router = APIRouter(prefix="/v1", tags=["models"], responses=ERROR_RESPONSES)


def model_object(row: dict) -> t.ModelObject:
    return t.ModelObject(
        id=row["name"],
        created=int(row["created_at"]),
        owned_by=row["org_id"],
        kind=row["kind"],
        base_model=row["base_model"],
        job_id=row["job_id"],
        run_id=row["run_id"],
        files=row["files"] or {},
        checkpoints=mstore.checkpoints(row["files"] or {}),
        bytes=row["bytes"] or 0,
        updated_at=row["updated_at"],
    )


@router.get("/models", response_model=t.ModelList)
async def list_models(
    request: Request,
    base_model: str | None = Query(default=None, max_length=500),
    limit: int = Query(default=100, ge=1, le=1000),
    p: Principal = Depends(principal),
) -> t.ModelList:
    """Models this organization's jobs produced, newest first, then models that running
    deployments serve without being registered (OpenAI's list shape; `deployed` says which
    ones `/v1/chat/completions` answers for now)."""
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return mstore.list_models(conn, p.org_id, limit=limit, base_model=base_model)

    models = [model_object(r) for r in await state.call(work)]
    # what `/v1/chat/completions` can answer for now: registered or not
    served = set((await state.deployments.table(state, p.org_id)).routes)
    for m in models:
        m.deployed = m.id in served
    if base_model is None:
        now = time.time()
        known = {m.id for m in models}
        models += [
            t.ModelObject(
                id=name, created=int(now), owned_by=p.org_id, updated_at=now, deployed=True
            )
            for name in sorted(served - known)
        ]
    return t.ModelList(data=models)


@router.get("/models/{name:path}", response_model=t.ModelObject)
async def retrieve_model(
    name: str, request: Request, p: Principal = Depends(principal)
) -> t.ModelObject:
    """One model by name, e.g. `GET /v1/models/my-org/qwen-ft-ftjob-1a2b`."""
    state = request.app.state.ow

    def work():
        with state.db.read() as conn:
            return mstore.get_model(conn, p.org_id, name)

    return model_object(await state.call(work))


@router.delete("/models/{name:path}", response_model=t.ModelObject)
async def delete_model(
    name: str, request: Request, p: Principal = Depends(principal)
) -> t.ModelObject:
    """Forget a model (its files stay, as results of the job that made it)."""
    require(p, "user")
    state = request.app.state.ow

    def work():
        with state.db.write() as conn:
            return mstore.delete_model(conn, p.org_id, name)

    return model_object(await state.call(work))
