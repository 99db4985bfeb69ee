"""PostgreSQL's claim function (`ow_claim_v1`, migration 0005) against the Python path it replaces.

Two real servers on two fresh PostgreSQL databases — one with the function, one with
`OPENWEIGHTS_PG_CLAIM_FUNCTION=0` — answer the same sequence of HTTP requests: claims across a
page of misfits, a cached-model preference, docker images, completions carried by claims
(completed with merged outputs, failed, a canceled job, a run with a log, a run that declared a
model, a resend, a refused one, a lost run), another worker's token, a shut-down worker. Every
answer and every row of jobs, runs, workers, tokens and files must agree once ids and clocks are
normalised; the function must really have answered the common cases (PostgreSQL's own function
statistics count its successful calls) and never the others.
"""

from __future__ import annotations

import re

import httpx
import psycopg
import pytest

pytestmark = pytest.mark.postgres

W1 = {"name": "w1", "hardware": {"hardware_type": "1x A10", "vram_gb": 24.0, "gpu_count": 1},
      "cached_models": ["m2"]}  # fmt: skip
W2 = {"name": "w2", "docker_image": "img:1",
      "hardware": {"hardware_type": "1x H200", "vram_gb": 141.0, "gpu_count": 1}}  # fmt: skip


#: ids that differ between two servers: random ones, and job ids (a hash that includes the org)
_RANDOM = re.compile(r"\b(?:org|worker|tok|job)-[0-9a-f]{12,16}\b")


def _job(**over) -> dict:
    return {"type": "custom", "script": "true", "params": {}, **over}


def _norm(value, ids: dict):
    """Ids that differ between the two servers (random ones) → their order of appearance;
    clocks → whether they are set."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in ("token", "prefix", "token_hash") and isinstance(v, str):
                out[k] = "<secret>"
            elif k.endswith("_at") or k in ("now",):
                out[k] = v is not None
            elif k == "env":
                out[k] = sorted(v)
            else:
                out[k] = _norm(v, ids)
        return out
    if isinstance(value, (list, tuple)):
        return [_norm(v, ids) for v in value]
    if isinstance(value, str):  # org-, worker-, tok-, a job's id, also inside messages
        return _RANDOM.sub(
            lambda m: ids.setdefault(m[0], f"{m[0].split('-', 1)[0]}-{len(ids)}"), value
        )
    return value


def _scenario(url: str) -> tuple[list, str]:
    """The requests; returns every answer (status, body) and the org id."""
    out: list = []
    with httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
        r = c.post("/v1/signup", json={"org_name": "lab"})
        user = {"authorization": f"Bearer {r.json()['token']['token']}"}
        org_id = r.json()["org"]["id"]
        wtok = c.post("/v1/tokens", json={"kind": "worker", "name": "w"}, headers=user).json()
        wauth = {"authorization": f"Bearer {wtok['token']}"}
        other = c.post("/v1/tokens", json={"kind": "worker", "name": "x"}, headers=user).json()
        oauth = {"authorization": f"Bearer {other['token']}"}

        def call(method: str, path: str, auth=wauth, **kw):
            r = c.request(method, path, headers=auth, **kw)
            body = r.json() if r.content else None
            out.append((method, path.split("/")[2], r.status_code, body))
            return body

        w1 = call("POST", "/v1/workers", json=W1)["id"]
        w2 = call("POST", "/v1/workers", json=W2)["id"]
        for i in range(10):  # a page of misfits for w1 (the first scan reads 8)
            call("POST", "/v1/jobs", user, json=_job(params={"i": i}, allowed_hardware=["1x H100"]))
        call("POST", "/v1/jobs", user, json=_job(params={"big": 1}, requires_vram_gb=80))
        call("POST", "/v1/jobs", user, json=_job(params={"m": 1}, model="m1", requires_vram_gb=16))
        call("POST", "/v1/jobs", user, json=_job(params={"m": 2}, model="m2"))
        call("POST", "/v1/jobs", user, json=_job(params={"h": 1}, allowed_hardware=["1x A10"]))
        call("POST", "/v1/jobs", user, json=_job(params={"img": 1}, docker_image="img:1"))
        call("POST", "/v1/jobs", user, json=_job(params={"img": 2}, docker_image="img:2"))
        for i in range(5):  # only the H200 fits these
            call("POST", "/v1/jobs", user, json=_job(params={"x": i}, requires_vram_gb=100))

        def claim(worker: str, done: dict | None = None, auth=wauth):
            body = {"wait_s": 0} if done is None else {"wait_s": 0, "done": done}
            return call("POST", f"/v1/workers/{worker}/claim", auth, json=body)

        # The comments say what each claim takes and whether the function answers it (fast)
        # or the Python path does (its statuses, a log to store, a model to register...).
        a = claim(w1)  # m2: the cached model first, past the page of misfits (fast)
        call("POST", f"/v1/runs/{a['run']['id']}/events", json={"events": [
            {"data": {"loss": 1.5, "step": 1, "note": None}},
            {"data": {"loss": 0.5, "step": 2, "file": "x"}},
            {"data": {"nested": {"k": [1, 2.25]}, "step": None}},
        ]})  # fmt: skip
        b = claim(
            w1, {"run_id": a["run"]["id"], "status": "completed", "exit_code": 0}
        )  # m1 (fast)
        c_ = claim(w1, {"run_id": b["run"]["id"], "status": "failed", "exit_code": 3})  # h (fast)
        call("POST", f"/v1/jobs/{c_['job']['id']}/cancel", user)
        d = claim(w2)  # big: 80 GB fits the H200; img:2 is another image (fast)
        # the canceled job's run completes: the job stays canceled; w1 takes img:1 (fast)
        claim(w1, {"run_id": c_["run"]["id"], "status": "completed", "exit_code": 0})
        claim(w1, {"run_id": c_["run"]["id"], "status": "completed", "exit_code": 0})  # resend
        claim(w1, {"run_id": c_["run"]["id"], "status": "failed", "exit_code": 1})  # refused
        e = claim(w2, {"run_id": d["run"]["id"], "status": "failed", "error": "boom"})  # x0 (fast)
        # a run with a log: the Python path stores it, then claims x1
        c.post(f"/v1/runs/{e['run']['id']}/logs?offset=0", content=b"hello\n", headers=wauth)
        f = claim(w2, {"run_id": e["run"]["id"], "status": "completed", "exit_code": 0})
        # a run that declares a model: the Python path registers it, then claims x2
        weights = call("POST", "/v1/files?purpose=model&filename=w.bin", user, content=b"weights")
        call("POST", f"/v1/runs/{f['run']['id']}/events", json={"events": [
            {"data": {"path": "uploads/model/w.bin"}, "file": weights["id"]},
            {"data": {"type": "model", "name": "lab/m", "base_model": "b", "kind": "full",
                      "prefix": "uploads/model"}}]})  # fmt: skip
        g = claim(w2, {"run_id": f["run"]["id"], "status": "completed", "exit_code": 0})
        h = claim(w2, {"run_id": g["run"]["id"], "status": "canceled"})  # x3 (fast)
        claim(w2, {"run_id": h["run"]["id"], "status": "lost", "error": "gone"})  # requeued
        claim(w1, None, oauth)  # another worker token: 403
        claim(w1, {"run_id": 10**6, "status": "completed"})  # no such run: 404 naming done
        call("POST", f"/v1/workers/{w1}/shutdown", user)
        claim(w1)  # shut down: 409
        call("GET", "/v1/jobs?limit=100", user)
    return out, org_id


def _tables(dsn: str) -> dict:
    with psycopg.connect(dsn) as conn:
        out = {}
        for table, order in (("jobs", "pk"), ("runs", "id"), ("workers", "name"),
                             ("tokens", "kind, run_id, name"), ("files", "id"),
                             ("models", "1")):  # fmt: skip
            cur = conn.execute(f"SELECT * FROM {table} ORDER BY {order}")
            names = [d.name for d in cur.description]
            out[table] = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        return out


def _function_calls(pg, dbname: str) -> int:
    with psycopg.connect(pg.url_for(dbname)) as conn:
        row = conn.execute(
            "SELECT calls FROM pg_stat_user_functions WHERE funcname = 'ow_claim_v1'"
        ).fetchone()
    return row[0] if row else 0


def test_claim_function_answers_as_the_python_path_does(server_factory, pg):
    results = {}
    for mode in ("function", "python"):
        env = {} if mode == "function" else {"OPENWEIGHTS_PG_CLAIM_FUNCTION": "0"}
        srv = server_factory("postgres", **env)
        dsn = srv.env["OPENWEIGHTS_DATABASE_URL"]
        dbname = dsn.rsplit("/", 1)[1]
        with psycopg.connect(pg.url_for(dbname), autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {dbname} SET track_functions = 'pl'")
        srv.stop()  # restarted so that its connections have the setting
        srv.start()
        answers, _ = _scenario(srv.url)
        srv.stop()  # its connections close and flush their statistics
        ids: dict = {}
        results[mode] = (_norm(answers, ids), _norm(_tables(dsn), ids))
        results[mode + "_calls"] = _function_calls(pg, dbname)

    fa, ft = results["function"]
    pa, pt = results["python"]
    assert len(fa) == len(pa)
    for i, (x, y) in enumerate(zip(fa, pa, strict=True)):
        assert x == y, f"answer {i} differs"
    for table in pt:
        assert ft[table] == pt[table], table
    # the answers are the scenario's (see its comments)
    statuses = [s for _, what, s, _ in pa if what == "workers"]
    assert statuses.count(403) == 1 and statuses.count(404) == 1 and statuses.count(409) == 2
    jobs = {next(iter(j["params"].items())): j for j in pt["jobs"]}
    assert jobs[("m", 2)]["outputs"] == {
        "loss": 0.5, "step": 2, "file": "x", "nested": {"k": [1, 2.25]}
    }  # fmt: skip
    assert jobs[("m", 1)]["status"] == "failed" and jobs[("m", 1)]["error"] == "exit code 3"
    assert jobs[("h", 1)]["status"] == "canceled"
    assert jobs[("big", 1)]["error"] == "boom"
    assert jobs[("x", 3)]["attempts"] == 2  # lost, requeued in its old place, claimed again
    assert jobs[("img", 2)]["status"] == "in_progress"  # the resend's claim
    assert [m["name"] for m in pt["models"]] == ["lab/m"]
    # The function answered the 7 claims marked fast, and only those (PostgreSQL counts its
    # successful calls); the Python server never called it.
    assert results["python_calls"] == 0
    assert results["function_calls"] == 7, results["function_calls"]


def _calls(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT funcname, calls FROM pg_stat_user_functions WHERE funcname LIKE 'ow_claim%'"
        ).fetchall()
    return dict(rows)


def test_claims_that_arrive_together_go_in_one_call_and_a_fallback_is_answered_alone(
    server_factory, pg
):
    """One claim is held in the database (its worker's row locked from outside); five more
    arrive meanwhile and go in the next call, together (the first, alone, was a call of the
    function itself): four take jobs from the function; the
    fifth, of a shut-down worker, falls back alone (its subtransaction rolled back) and the
    Python path answers it 409. Every job is taken once."""
    import threading
    import time

    srv = server_factory("postgres")
    dsn = srv.env["OPENWEIGHTS_DATABASE_URL"]
    dbname = dsn.rsplit("/", 1)[1]
    with psycopg.connect(pg.url_for(dbname), autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {dbname} SET track_functions = 'pl'")
    srv.stop()
    srv.start()
    with httpx.Client(base_url=srv.url, trust_env=False, timeout=30) as c:
        r = c.post("/v1/signup", json={"org_name": "lab"})
        user = {"authorization": f"Bearer {r.json()['token']['token']}"}
        workers = [
            c.post("/v1/workers", json={**W1, "name": f"w{i}"}, headers=user).json()["id"]
            for i in range(6)
        ]
        for i in range(8):
            assert c.post("/v1/jobs", json=_job(params={"i": i}), headers=user).status_code == 200
        assert c.post(f"/v1/workers/{workers[5]}/shutdown", headers=user).status_code == 200

    answers: dict[int, httpx.Response] = {}

    def claim(k: int) -> None:
        with httpx.Client(base_url=srv.url, trust_env=False, timeout=30) as cl:
            answers[k] = cl.post(
                f"/v1/workers/{workers[k]}/claim", json={"wait_s": 0}, headers=user
            )

    with (
        psycopg.connect(pg.url_for(dbname)) as lock,
        psycopg.connect(pg.url_for(dbname), autocommit=True) as watch,
    ):
        lock.execute("SELECT 1 FROM workers WHERE id = %s FOR UPDATE", (workers[0],))
        first = threading.Thread(target=claim, args=(0,))
        first.start()
        for _ in range(200):  # until the first claim waits for the lock in the database
            waiting = watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%ow_claim_v1%'"
            ).fetchone()[0]
            if waiting:
                break
            time.sleep(0.02)
        assert waiting == 1
        rest = [threading.Thread(target=claim, args=(k,)) for k in range(1, 6)]
        for t in rest:
            t.start()
        time.sleep(1.0)  # they reach the server and wait behind the call in the database
        lock.rollback()  # the first call goes on; the five go in the next one
    for t in [first, *rest]:
        t.join(timeout=30)

    assert [answers[k].status_code for k in range(6)] == [200] * 5 + [409]
    jobs = [answers[k].json()["job"]["id"] for k in range(5)]
    assert len(set(jobs)) == 5
    srv.stop()  # its connections flush their function statistics
    calls = _calls(pg.url_for(dbname))
    # the first went alone (ow_claim_v1 itself), the five in one batch
    assert calls.get("ow_claim_batch_v1") == 1, calls
    assert calls.get("ow_claim_v1") == 5, calls  # the shut-down worker's raised: not counted
    with psycopg.connect(pg.url_for(dbname)) as conn:
        runs = conn.execute("SELECT worker_id FROM runs ORDER BY id").fetchall()
        assert sorted(w for (w,) in runs) == sorted(workers[:5])  # nothing of the fallback's
