"""The hot path (claim, heartbeat, logs, completion, secrets, auth) on prebuilt named queries:
the same guarantees as before on both dialects, and cache invalidation across servers."""

from __future__ import annotations

import threading

import httpx
import pytest
from cryptography.fernet import Fernet

from openweights import types as t
from openweights.store import jobs as q
from openweights.store import orgs, queries
from openweights.store.db import Database
from openweights.store.errors import Conflict, Fenced, Forbidden, NotFound
from openweights.store.orgs import Principal
from tests.conftest import wait_until


def _org(db: Database, now: float = 1000.0) -> str:
    with db.write() as conn:
        return orgs.create_org(conn, "o", now)["id"]


def _worker(db: Database, org_id: str, now: float = 1000.0, **hw) -> dict:
    req = t.WorkerRegister(**({"any_hardware": True} if not hw else hw))
    with db.write() as conn:
        return q.register_worker(conn, org_id, req, "tok-w", now)


def _job(db: Database, org_id: str, now: float, **over) -> dict:
    body = {"type": "custom", "script": "true", "params": {"n": now}, **over}
    with db.write() as conn:
        return q.create_job(conn, org_id, t.JobCreateParams(**body), now, 3, lock=False)[0]


def _claim(db: Database, org_id: str, worker_id: str, now: float, lease_s: float = 30.0):
    with db.write() as conn:
        worker = q.checkin_worker(conn, org_id, worker_id, now)
        return q.claim(conn, worker, now, lease_s)


def test_every_named_query_parses_and_returns_its_columns_by_position():
    names = {name for name, _ in queries.QUERIES}
    assert {"claim_candidates", "claim_take", "lock_run", "renew_lease", "authenticate"} <= names
    # a dialect variant falls back to the shared statement where it has none
    assert ("claim_take", "postgresql") in queries.QUERIES
    assert ("lock_run", "postgresql") in queries.QUERIES
    lock = queries.QUERIES[("lock_run", "")]
    assert [c.name for c in lock.selected_columns][-2:] == ["job_max_attempts", "worker_token_id"]
    with pytest.raises(ValueError, match="description"):
        queries.parse("-- x --\nSELECT 1")
    with pytest.raises(ValueError, match="twice"):
        queries.parse("-- x --\n-- d\nSELECT 1\n-- x --\n-- d\nSELECT 2")


def test_claim_takes_the_oldest_fitting_job_past_a_page_of_misfits(db):
    org = _org(db)
    w = _worker(db, org, hardware=t.Hardware(hardware_type="A10", vram_gb=24.0))
    # more misfits than the first page of candidates: the scan must page on
    for i in range(12):
        _job(db, org, 1000.0 + i, allowed_hardware=["H100"], params={"i": i})
    _job(db, org, 2000.0, requires_vram_gb=80)  # filtered out in SQL
    fits = _job(db, org, 3000.0, requires_vram_gb=16)
    later = _job(db, org, 4000.0)
    c = _claim(db, org, w["id"], 5000.0)
    assert c.job["id"] == fits["id"] and c.job["status"] == "in_progress"
    assert c.run["attempt"] == 1 and c.run["job_id"] == fits["id"]
    assert c.run["lease_expires_at"] == pytest.approx(5030.0)
    assert _claim(db, org, w["id"], 5001.0).job["id"] == later["id"]
    assert _claim(db, org, w["id"], 5002.0) is None
    with db.read() as conn:
        worker = q.get_worker(conn, org, w["id"])
        assert worker["last_seen_at"] == 5002.0 and worker["current_run_id"] is not None
        p, _ = orgs.authenticate(conn, c.token, 5003.0)
    assert p.kind == "run" and p.run_id == c.run["id"]


def test_claim_prefers_a_cached_model_then_the_oldest(db):
    org = _org(db)
    w = _worker(db, org, any_hardware=True, cached_models=["m2"])
    _job(db, org, 1.0, model="m1")
    m2 = _job(db, org, 2.0, model="m2")
    assert _claim(db, org, w["id"], 10.0).job["id"] == m2["id"]


def test_checkin_of_another_orgs_worker_is_not_found(db):
    org, other = _org(db), _org(db)
    w = _worker(db, org)
    with db.write() as conn, pytest.raises(NotFound):
        q.checkin_worker(conn, other, w["id"], 1.0)
    with db.read() as conn:
        worker = q.get_worker(conn, org, w["id"])
    with pytest.raises(Forbidden):
        q.check_worker_caller(worker, Principal(org_id=org, token_id="other", kind="worker"))


def test_concurrent_claims_never_take_the_same_job(db):
    org = _org(db)
    workers = [_worker(db, org) for _ in range(6)]
    for i in range(30):
        _job(db, org, 100.0 + i)
    taken: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(workers))

    def loop(w: dict) -> None:
        try:
            barrier.wait()
            while (c := _claim(db, org, w["id"], 200.0)) is not None:
                taken.append(c.job["id"])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    assert len(taken) == 30 and len(set(taken)) == 30


def test_heartbeat_renews_only_the_live_run_and_answers_precisely(db):
    org = _org(db)
    w = _worker(db, org)
    _job(db, org, 1.0)
    c = _claim(db, org, w["id"], 10.0, lease_s=30.0)
    run_id = c.run["id"]
    owner = Principal(org_id=org, token_id="tok-w", kind="worker")
    with db.write() as conn:
        lease, cancel = q.heartbeat(conn, org, run_id, 39.0, 30.0, None, caller=owner)
    assert lease == 69.0 and cancel is False
    stranger = Principal(org_id=org, token_id="tok-x", kind="worker")
    with pytest.raises(Forbidden), db.write() as conn:
        q.heartbeat(conn, org, run_id, 40.0, 30.0, None, caller=stranger)
    with db.read() as conn:  # the refused renewal was rolled back
        assert q.get_run(conn, org, run_id)["lease_expires_at"] == 69.0
    with pytest.raises(Fenced, match="lost its lease"), db.write() as conn:
        q.heartbeat(conn, org, run_id, 69.5, 30.0, None)
    other_org = _org(db)
    with pytest.raises(NotFound), db.write() as conn:
        q.heartbeat(conn, other_org, run_id, 50.0, 30.0, None)
    with db.write() as conn:
        run, job = q.live_run(conn, org, run_id, 50.0)
        q.finish_run(conn, run, job, status="completed", now=50.0, exit_code=0)
    with pytest.raises(Fenced, match="no longer the live run"), db.write() as conn:
        q.heartbeat(conn, org, run_id, 51.0, 30.0, None)


def test_logs_events_and_completion_on_the_live_run(db):
    org = _org(db)
    w = _worker(db, org)
    job = _job(db, org, 1.0)
    c = _claim(db, org, w["id"], 10.0)
    run_id = c.run["id"]
    job_token = Principal(org_id=org, token_id="tok-r", kind="run", run_id=run_id)
    with db.write() as conn:
        assert q.append_log(conn, org, run_id, 0, b"hello ", 11.0, None, caller=job_token) == 6
        assert q.append_log(conn, org, run_id, 0, b"hello world", 12.0, None) == 11  # a resend
    other_run = Principal(org_id=org, token_id="tok-r2", kind="run", run_id=run_id + 1)
    with pytest.raises(Forbidden), db.write() as conn:
        q.append_log(conn, org, run_id, 11, b"!", 12.0, None, caller=other_run)
    with db.write() as conn:
        run, _ = q.live_run(conn, org, run_id, 13.0, caller=job_token)
        events = [t.EventCreate(data={"loss": 1.0, "x": 1}), t.EventCreate(data={"loss": 0.5})]
        assert q.add_events(conn, run, events, 13.0) == 2
    with db.read() as conn:
        assert b"".join(d for _, d in q.read_log_chunks(conn, run_id, 0)) == b"hello world"
    with db.write() as conn:
        run, j = q.live_run(conn, org, run_id, 14.0)
        q.finish_run(conn, run, j, status="completed", now=14.0, exit_code=0, log_file="f")
        q.delete_log_chunks(conn, run_id)
    with db.read() as conn:
        done = q.get_job(conn, org, job["id"])
        run = q.get_run(conn, org, run_id)
        assert q.read_log_chunks(conn, run_id, 0) == []
        assert q.get_worker(conn, org, w["id"])["current_run_id"] is None
        with pytest.raises(Exception, match="revoked"):
            orgs.authenticate(conn, c.token, 15.0)
    assert done["status"] == "completed" and done["outputs"] == {"loss": 0.5, "x": 1}
    assert run["status"] == "completed" and run["log_file"] == "f" and run["log_size"] == 11


def test_a_lost_run_requeues_its_job_until_attempts_run_out(db):
    org = _org(db)
    w = _worker(db, org)
    job = _job(db, org, 1.0, max_attempts=2)
    for attempt, expected in ((1, "pending"), (2, "failed")):
        c = _claim(db, org, w["id"], 10.0 * attempt, lease_s=5.0)
        assert c.run["attempt"] == attempt
        with db.write() as conn:  # renewed after the sweeper listed it: not lost
            assert q.lose_run(conn, c.run["id"], 10.0 * attempt + 1, "lease expired") is None
            lost = q.lose_run(conn, c.run["id"], 10.0 * attempt + 6, "lease expired")
        assert lost["status"] == expected and lost["id"] == job["id"]
    assert "the last was lost: lease expired" in lost["error"]


# -- through the server ---------------------------------------------------------------------


def _api(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _claim_env(api: httpx.Client, worker_id: str, n: int) -> dict:
    assert api.post("/v1/jobs", json={"type": "custom", "script": f"true {n}"}).status_code == 200
    r = api.post(f"/v1/workers/{worker_id}/claim", json={"wait_s": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    done = api.post(f"/v1/runs/{body['run']['id']}/complete", json={"status": "completed"})
    assert done.status_code == 200, done.text
    return body["env"]


def test_a_claim_sees_secret_writes_at_once(server):
    api = _api(server.url, server.signup())
    w = api.post("/v1/workers", json={"name": "w", "any_hardware": True}).json()["id"]
    api.put("/v1/secrets/HF_TOKEN", json={"value": "one"})
    assert _claim_env(api, w, 1) == {"HF_TOKEN": "one"}  # now cached
    api.put("/v1/secrets/HF_TOKEN", json={"value": "two"})
    assert _claim_env(api, w, 2) == {"HF_TOKEN": "two"}
    api.delete("/v1/secrets/HF_TOKEN")
    assert _claim_env(api, w, 3) == {}
    assert api.get("/health").headers["x-request-id"]
    assert api.get("/health", headers={"x-request-id": "abc"}).headers["x-request-id"] == "abc"
    # the hot routes (fast.FastPath, in front of FastAPI's stack) carry it too, errors included
    r = api.post(f"/v1/workers/{w}/claim", json={"wait_s": 0}, headers={"x-request-id": "c1"})
    assert r.status_code == 204 and r.headers["x-request-id"] == "c1"
    r = api.post("/v1/runs/999999/complete", json={"status": "completed"})
    assert r.status_code == 404 and r.headers["x-request-id"] and r.json()["error"]["type"]


def _two_servers(server_factory, pg):
    """Two servers on one fresh PostgreSQL database (one secret key), and an admin key."""
    url = pg.create_database()
    key = Fernet.generate_key().decode()
    a = server_factory("postgres", OPENWEIGHTS_DATABASE_URL=url, OPENWEIGHTS_SECRET_KEY=key)
    b = server_factory("postgres", OPENWEIGHTS_DATABASE_URL=url, OPENWEIGHTS_SECRET_KEY=key)
    return a, b, a.signup()


@pytest.mark.postgres
def test_secret_writes_and_revocations_reach_other_servers(server_factory, pg):
    a, b, admin = _two_servers(server_factory, pg)
    api_a, api_b = _api(a.url, admin), _api(b.url, admin)
    w = api_b.post("/v1/workers", json={"name": "w", "any_hardware": True}).json()["id"]
    api_a.put("/v1/secrets/HF_TOKEN", json={"value": "one"})
    assert _claim_env(api_b, w, 1) == {"HF_TOKEN": "one"}  # cached on b
    api_a.put("/v1/secrets/HF_TOKEN", json={"value": "two"})
    n = iter(range(2, 1000))
    wait_until(lambda: _claim_env(api_b, w, next(n)) == {"HF_TOKEN": "two"}, 5, "b sees it")
    tok = api_a.post("/v1/tokens", json={"name": "x"}).json()
    assert _api(b.url, tok["token"]).get("/v1/me").status_code == 200  # cached on b
    api_a.delete(f"/v1/tokens/{tok['id']}")
    wait_until(lambda: _api(b.url, tok["token"]).get("/v1/me").status_code == 401, 5, "revoked")


@pytest.mark.postgres
def test_a_job_created_on_one_server_wakes_a_claim_parked_on_another_and_back(server_factory, pg):
    """A new job (created in one round trip, its NOTIFY in the insert's statement) reaches a
    claim parked on another server at once, not at the end of its 10 s slice; the claim's
    completion (ow_claim_v1's NOTIFYs) reaches a `wait` parked on the first (5 s slices)."""
    import time

    a, b, admin = _two_servers(server_factory, pg)
    api_a, api_b = _api(a.url, admin), _api(b.url, admin)
    w = api_b.post("/v1/workers", json={"name": "w", "any_hardware": True}).json()["id"]
    got: dict = {}

    def park(name: str, fn) -> threading.Thread:
        def run():
            t0 = time.monotonic()
            got[name] = fn()
            got[name + "_s"] = time.monotonic() - t0

        th = threading.Thread(target=run)
        th.start()
        return th

    with _api(b.url, admin) as claimer:
        th = park("claim", lambda: claimer.post(f"/v1/workers/{w}/claim", json={"wait_s": 20}))
        time.sleep(0.5)  # parked on b
        job = api_a.post("/v1/jobs", json={"type": "custom", "script": "true", "params": {}})
        assert job.status_code == 200 and job.json()["status"] == "pending"
        th.join(timeout=30)
    assert got["claim"].status_code == 200 and got["claim_s"] < 4.0, got
    claimed = got["claim"].json()
    assert claimed["job"]["id"] == job.json()["id"]

    with _api(a.url, admin) as waiter:
        th = park("wait", lambda: waiter.get(f"/v1/jobs/{job.json()['id']}/wait?timeout_s=20"))
        time.sleep(0.5)  # parked on a
        done = {"run_id": claimed["run"]["id"], "status": "completed", "exit_code": 0}
        assert (
            api_b.post(f"/v1/workers/{w}/claim", json={"wait_s": 0, "done": done}).status_code
            == 204
        )
        th.join(timeout=30)
    assert got["wait"].json()["status"] == "completed" and got["wait_s"] < 4.5, got


# -- the same store functions on the driver's own connection (server/fast.py) ---------------


def test_every_named_statement_has_a_driver_form():
    for (name, _dialect), stmt in queries.QUERIES.items():
        raw = queries.RAW[id(stmt)]
        assert ":" not in raw.postgresql.replace("::", ""), name  # every parameter translated
        assert raw.postgresql.count("%(") == raw.sqlite.count(":") - 2 * raw.sqlite.count("::")
    claim_start = queries.RAW[id(queries.QUERIES[("claim_start_job", "")])]
    assert claim_start.names[:3] == ("pk", "org_id", "id")
    assert {claim_start.names[i] for i in claim_start.json_out} == {
        "params",
        "allowed_hardware",
        "outputs",
    }


def test_the_hot_path_on_the_driver_connection_matches_sqlalchemy(db):
    raw = queries.RawDatabase(db.url)
    try:
        org = _org(db)
        w = _worker(db, org, cached_models=["m"], hardware=t.Hardware(vram_gb=8.0))
        mine = _job(db, org, 1.0, allowed_hardware=["cpu"], model="m", params={"a": [1, {"b": 2}]})
        _job(db, org, 2.0, requires_vram_gb=80)  # never fits
        token = Principal(org_id=org, token_id="tok-w", kind="worker")

        def claim(conn):
            worker = q.checkin_worker(conn, org, w["id"], 10.0)
            q.check_worker_caller(worker, token)
            assert worker["cached_models"] == ["m"]  # JSON decoded, as SQLAlchemy does
            return q.claim(conn, worker, 10.0, 30.0)

        c = raw.run(claim)
        assert c.job["id"] == mine["id"] and c.job["params"] == {"a": [1, {"b": 2}]}
        assert c.job["allowed_hardware"] == ["cpu"] and c.job["status"] == "in_progress"
        assert raw.run(claim) is None  # the other job does not fit
        run_id = c.run["id"]
        with db.read() as conn:
            assert q.get_job(conn, org, mine["id"])["current_run_id"] == run_id
            p, _ = orgs.authenticate(conn, c.token, 11.0)
        assert p.run_id == run_id

        def heartbeat(conn):
            return q.heartbeat(conn, org, run_id, 20.0, 30.0, None, caller=token)

        assert raw.run(heartbeat) == (50.0, False)
        with pytest.raises(Forbidden):  # and the refused renewal is rolled back
            raw.run(
                lambda conn: q.heartbeat(
                    conn, org, run_id, 25.0, 30.0, None, caller=Principal(org, "x", "worker")
                )
            )
        assert raw.run(lambda conn: q.run_status(conn, org, run_id), write=False) == (
            "in_progress",
            "in_progress",
        )
        with db.write() as conn:
            run, _ = q.live_run(conn, org, run_id, 21.0)
            q.add_events(conn, run, [t.EventCreate(data={"loss": 1.0, "n": None})], 21.0)

        def finish(conn):
            run, job = q.lock_run(conn, org, run_id)
            q.check_run_caller(run, token)
            q.check_live(run, job, 22.0, check_lease=False)
            q.finish_run(conn, run, job, status="completed", now=22.0, exit_code=0)

        raw.run(finish)
        with db.read() as conn:
            done = q.get_job(conn, org, mine["id"])
            assert q.get_run(conn, org, run_id)["status"] == "completed"
            with pytest.raises(Exception, match="revoked"):
                orgs.authenticate(conn, c.token, 23.0)
        assert done["status"] == "completed" and done["outputs"] == {"loss": 1.0}
        with pytest.raises(Fenced):
            raw.run(heartbeat)
    finally:
        raw.close()


def test_a_statement_that_is_not_named_rolls_the_driver_transaction_back(db):
    raw = queries.RawDatabase(db.url)
    try:
        org = _org(db)
        w = _worker(db, org)

        def mixed(conn):
            q.touch_worker(conn, w["id"], 77.0)  # named: runs on the driver
            return q.get_worker(conn, org, w["id"])  # SQLAlchemy Core: refused

        with pytest.raises(queries.NotRaw):
            raw.run(mixed)
        with db.read() as conn:  # nothing of it stayed
            assert q.get_worker(conn, org, w["id"])["last_seen_at"] == 1000.0
        raw.run(lambda conn: q.touch_worker(conn, w["id"], 78.0))  # the connection still works
        with db.read() as conn:
            assert q.get_worker(conn, org, w["id"])["last_seen_at"] == 78.0
    finally:
        raw.close()


def test_concurrent_driver_claims_never_take_the_same_job(db):
    raw = queries.RawDatabase(db.url)
    try:
        org = _org(db)
        workers = [_worker(db, org) for _ in range(6)]
        for i in range(30):
            _job(db, org, 100.0 + i)
        taken: list[str] = []
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(workers))

        def loop(w: dict) -> None:
            def claim(conn):
                return q.claim(conn, q.checkin_worker(conn, org, w["id"], 200.0), 200.0, 30.0)

            try:
                barrier.wait()
                while (c := raw.run(claim)) is not None:
                    taken.append(c.job["id"])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors
        assert len(taken) == 30 and len(set(taken)) == 30
    finally:
        raw.close()


def test_sqlite_nowait_transaction_reports_a_held_write_lock(tmp_path):
    d = Database(f"sqlite:///{tmp_path / 'x.db'}")
    d.migrate()
    raw = queries.RawDatabase(d.url)
    try:
        org = _org(d)
        with d.write() as conn:  # holds the write lock (BEGIN IMMEDIATE)
            with pytest.raises(queries.Busy):
                raw.run(lambda c: None, wait=False)
            secrets = queries.QUERIES[("secret_env", "")]  # a read does not wait for the lock
            assert raw.run(lambda c: c.execute(secrets, {"org_id": org}).all(), write=False) == []
            orgs.create_org(conn, "x", 1.0)
        assert raw.run(lambda c: org, wait=False) == org
    finally:
        raw.close()
        d.dispose()


@pytest.mark.postgres
def test_a_postgres_connection_dropped_while_idle_is_replaced(pg):
    url = pg.create_database().replace("postgresql://", "postgresql+psycopg://")
    d = Database(url)
    d.migrate()
    raw = queries.RawDatabase(url)
    try:
        org = _org(d)
        w = _worker(d, org)
        raw.run(lambda conn: q.touch_worker(conn, w["id"], 5.0))
        pid = raw.run(lambda conn: conn.dbapi.info.backend_pid)
        with d.write() as conn:  # the database drops the idle pooled connection
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        raw.run(lambda conn: q.touch_worker(conn, w["id"], 6.0))  # run again on a new one
        assert raw.run(lambda conn: conn.dbapi.info.backend_pid) != pid
        with d.read() as conn:
            assert q.get_worker(conn, org, w["id"])["last_seen_at"] == 6.0
    finally:
        raw.close()
        d.dispose()


def test_the_fast_path_answers_exactly_as_the_routes(server):
    """Each request twice: first with a token the server has not cached (the FastAPI route
    answers), then cached (`fast.FastPath` answers, or hands it to the route)."""
    admin = server.signup()
    api = _api(server.url, admin)
    w = api.post("/v1/workers", json={"name": "w", "any_hardware": True}).json()["id"]
    job = api.post("/v1/jobs", json={"type": "custom", "script": "true fast"}).json()
    c = api.post(f"/v1/workers/{w}/claim", json={"wait_s": 1}).json()
    run_id, run_token = c["run"]["id"], c["token"]
    cases = [
        (admin, f"/v1/workers/{w}/claim", {"wait_s": "1"}),
        (admin, f"/v1/workers/{w}/claim", {"wait_s": True}),
        (admin, f"/v1/workers/{w}/claim", {"wait_s": 301}),
        (admin, f"/v1/workers/{w}/claim", [1]),
        (admin, f"/v1/workers/{w}/claim", {"wait_s": 0, "other": 1}),  # ignored by the model
        (admin, "/v1/workers/nope/claim", {"wait_s": 0}),
        (run_token, f"/v1/workers/{w}/claim", {"wait_s": 0}),  # a job's token may not claim
        (admin, f"/v1/runs/{run_id}/heartbeat", {"wait_s": -1}),
        (admin, f"/v1/runs/{run_id}/heartbeat", {"wait_s": 0}),
        (admin, f"/v1/runs/{run_id + 99}/heartbeat", {"wait_s": 0}),
        (admin, f"/v1/runs/{run_id}/complete", {"status": "done"}),
        (admin, f"/v1/runs/{run_id}/complete", {"status": "failed", "exit_code": "1"}),
        (admin, f"/v1/runs/{run_id}/complete", {"status": "failed", "extra": 1}),
        (admin, "/v1/jobs", {"type": "Bad Type", "script": "true"}),
        (admin, "/v1/jobs", {"type": "custom", "script": "true dup"}),  # then the same job
        (run_token, "/v1/jobs", {"type": "custom", "script": "true fast"}),
        ("ow_not_a_key", "/v1/jobs", {"type": "custom", "script": "true"}),
    ]
    for key, path, body in cases:
        answers = []
        for _ in range(2):
            r = httpx.post(
                server.url + path,
                json=body,
                headers={"Authorization": f"Bearer {key}"},
                timeout=30,
            )
            data = r.json() if r.content else None
            if isinstance(data, dict) and path.endswith("/heartbeat") and r.status_code == 200:
                data.pop("lease_expires_at")  # renewed by each call
            if isinstance(data, dict) and path == "/v1/jobs" and r.status_code == 200:
                data.pop("pending_reason")  # the worker's state changes between the two calls
                data.pop("updated_at")
            answers.append((r.status_code, data))
        assert answers[0] == answers[1], (path, body, answers)
        status, data = answers[0]
        assert status < 500, (path, body, answers)
        if status >= 400:
            assert set(data["error"]) == {"type", "message", "param"}, data
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] != "completed"
    api.post("/v1/jobs", json={"type": "custom", "script": "true fast 2"})
    run_id = api.post(f"/v1/workers/{w}/claim", json={"wait_s": 5}).json()["run"]["id"]
    done = api.post(f"/v1/runs/{run_id}/complete", json={"status": "completed", "exit_code": 0})
    assert done.status_code == 200 and done.json()["status"] == "completed"
    again = api.post(f"/v1/runs/{run_id}/complete", json={"status": "completed", "exit_code": 0})
    assert again.json() == done.json()  # a resend is answered the same


def test_a_parked_claim_whose_worker_left_takes_no_job(server):
    api = _api(server.url, server.signup())
    w = api.post("/v1/workers", json={"name": "w", "any_hardware": True}).json()["id"]
    api.post(f"/v1/workers/{w}/claim", json={"wait_s": 0})  # the token is cached now

    def leave() -> None:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(
                f"{server.url}/v1/workers/{w}/claim",
                json={"wait_s": 30},
                headers=api.headers,
                timeout=0.5,
            )

    th = threading.Thread(target=leave)
    th.start()
    th.join()
    job = api.post("/v1/jobs", json={"type": "custom", "script": "true left"}).json()
    r = api.post(f"/v1/workers/{w}/claim", json={"wait_s": 5})
    assert r.status_code == 200 and r.json()["job"]["id"] == job["id"]


@pytest.mark.postgres
def test_notify_from_a_driver_transaction_arrives_with_its_commit_only(pg):
    import psycopg

    url = pg.create_database().replace("postgresql://", "postgresql+psycopg://")
    d = Database(url)
    d.migrate()
    raw = queries.RawDatabase(url)
    try:
        org = _org(d)
        w = _worker(d, org)
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as listener:
            listener.execute("LISTEN openweights")

            def write(conn, fail: bool):
                q.touch_worker(conn, w["id"], 9.0)
                d.notify(conn, "openweights", ["a", "b"] if not fail else ["never"])
                if fail:
                    raise Conflict("no")

            with pytest.raises(Conflict):
                raw.run(lambda conn: write(conn, True))
            raw.run(lambda conn: write(conn, False))
            got = [n.payload for n in listener.notifies(timeout=2.0, stop_after=2)]
        assert got == ["a", "b"]
        with d.read() as conn:
            assert q.get_worker(conn, org, w["id"])["last_seen_at"] == 9.0
    finally:
        raw.close()
        d.dispose()
