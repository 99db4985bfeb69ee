"""The HTTP API against a real server process, on SQLite + local blobs and PostgreSQL + S3."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import LEASE_S, wait_until


class Api:
    def __init__(self, url: str, key: str) -> None:
        self.c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def __getattr__(self, name):
        return getattr(self.c, name)


@pytest.fixture
def api(server, api_key) -> Api:
    return Api(server.url, api_key)


def job_body(**over) -> dict:
    body = {
        "type": "custom",
        "id_prefix": "addjob",
        "params": {"validated_params": {"a": 1, "b": 2}},
        "script": "true",
    }
    body.update(over)
    return body


def register(api: Api, **over) -> str:
    r = api.post("/v1/workers", json={"name": "w", **over})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def claim(api: Api, worker_id: str, wait_s: float = 5) -> dict | None:
    r = api.post(f"/v1/workers/{worker_id}/claim", json={"wait_s": wait_s})
    assert r.status_code in (200, 204), r.text
    return r.json() if r.status_code == 200 else None


def test_job_id_is_a_content_hash_independent_of_key_order(api):
    a = api.post("/v1/jobs", json=job_body(params={"validated_params": {"a": 1, "b": 2}})).json()
    b = api.post("/v1/jobs", json=job_body(params={"validated_params": {"b": 2, "a": 1}})).json()
    c = api.post("/v1/jobs", json=job_body(params={"validated_params": {"a": 1, "b": 3}})).json()
    assert a["id"] == b["id"] != c["id"]
    assert a["id"].startswith("addjob-") and len(a["id"]) == len("addjob-") + 12
    d = api.post("/v1/jobs", json=job_body(job_id_suffix="again")).json()
    assert d["id"] == a["id"] + "-again"


def test_resubmitting_failed_job_requeues_it_and_completed_returns_it(api):
    w = register(api)
    job = api.post("/v1/jobs", json=job_body(script="exit 3")).json()
    got = claim(api, w)
    assert got["job"]["id"] == job["id"]
    run = got["run"]["id"]
    r = api.post(f"/v1/runs/{run}/complete", json={"status": "failed", "exit_code": 3})
    assert r.status_code == 200
    failed = api.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and "exit code 3" in failed["error"]
    again = api.post("/v1/jobs", json=job_body(script="exit 3")).json()
    assert again["id"] == job["id"] and again["status"] == "pending" and again["attempts"] == 0
    got = claim(api, w)
    api.post(f"/v1/runs/{got['run']['id']}/complete", json={"status": "completed", "exit_code": 0})
    same = api.post("/v1/jobs", json=job_body(script="exit 3")).json()
    assert same["status"] == "completed"
    runs = api.get(f"/v1/jobs/{job['id']}/runs").json()["data"]
    assert [r["attempt"] for r in runs] == [1, 1] and runs[-1]["status"] == "completed"


def test_pending_job_says_why_it_waits(api):
    job = api.post("/v1/jobs", json=job_body(requires_vram_gb=80)).json()
    assert "No worker is running" in job["pending_reason"]
    register(api)  # a CPU worker: 0 GB
    reason = api.get(f"/v1/jobs/{job['id']}").json()["pending_reason"]
    assert "No live worker fits" in reason and "80 GB" in reason


def test_a_job_behind_a_busy_worker_counts_the_jobs_ahead_up_to_a_cap(api):
    """The reason of a job behind a busy worker counts the jobs queued before it, up to
    AHEAD_CAP (beyond it "over N": the count is paid on every create and must not grow with
    the queue)."""
    from openweights.store.jobs import AHEAD_CAP

    w = register(api)
    assert claim(api, w, wait_s=0) is None
    api.post("/v1/jobs", json=job_body(job_id_suffix="running"))
    assert claim(api, w, wait_s=0) is not None  # the worker is busy from now on
    first = api.post("/v1/jobs", json=job_body(job_id_suffix="q0")).json()
    assert first["pending_reason"] == (
        "Waiting for a free worker: 1 of 1 fitting worker(s) busy, 0 job(s) ahead."
    )
    third = [api.post("/v1/jobs", json=job_body(job_id_suffix=f"q{i}")).json() for i in (1, 2)][1]
    assert third["pending_reason"].endswith(", 2 job(s) ahead."), third["pending_reason"]
    for i in range(3, AHEAD_CAP):  # q0 … q999: AHEAD_CAP jobs ahead of the next, counted exactly
        assert api.post("/v1/jobs", json=job_body(job_id_suffix=f"q{i}")).status_code == 200
    at_cap = api.post("/v1/jobs", json=job_body(job_id_suffix="at-cap")).json()
    assert at_cap["pending_reason"].endswith(f", {AHEAD_CAP} job(s) ahead."), at_cap
    over = api.post("/v1/jobs", json=job_body(job_id_suffix="over")).json()
    assert over["pending_reason"].endswith(f", over {AHEAD_CAP} job(s) ahead."), over
    # the same reason on a read (the other code path on both databases)
    assert api.get(f"/v1/jobs/{over['id']}").json()["pending_reason"] == over["pending_reason"]


def test_claim_matches_hardware_and_vram(api):
    cpu = register(api)
    gpu = register(
        api,
        hardware={"gpu_type": "A100", "gpu_count": 1, "vram_gb": 80, "hardware_type": "1x A100"},
    )
    big = api.post("/v1/jobs", json=job_body(requires_vram_gb=40, script="echo big")).json()
    h200 = api.post(
        "/v1/jobs", json=job_body(allowed_hardware=["1x H200"], script="echo h200")
    ).json()
    assert claim(api, cpu, wait_s=0) is None
    got = claim(api, gpu, wait_s=0)
    assert got["job"]["id"] == big["id"]
    assert claim(api, gpu, wait_s=0) is None  # the H200-only job does not fit an A100
    assert api.get(f"/v1/jobs/{h200['id']}").json()["status"] == "pending"


def test_long_poll_claim_wakes_when_a_job_arrives(api):
    w = register(api)
    import threading

    result = {}

    def poll():
        t0 = time.monotonic()
        result["claim"] = claim(api, w, wait_s=30)
        result["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.3)  # let the claim start waiting: the point is that it is already parked
    t0 = time.monotonic()
    api.post("/v1/jobs", json=job_body(script="echo wake"))
    th.join(30)
    assert result["claim"] is not None
    assert time.monotonic() - t0 < 5, (
        "a parked claim must be woken by the new job, not by its timeout"
    )


@pytest.mark.parametrize("route", ["fast", "fastapi"])
def test_claim_carries_the_previous_runs_completion(api, route):
    """One round trip per job: a claim's `done` completes the worker's last run first; when
    `done` is refused, the error names it and nothing is claimed. Both the fast path and the
    FastAPI route (a query string sends it there) answer alike."""
    qs = "" if route == "fast" else "?via=fastapi"
    w = register(api)
    a = api.post("/v1/jobs", json=job_body(script=f"echo a-{route}")).json()
    b = api.post("/v1/jobs", json=job_body(script=f"echo b-{route}")).json()
    first = claim(api, w, wait_s=0)
    assert first["job"]["id"] == a["id"]
    done = {"run_id": first["run"]["id"], "status": "completed", "exit_code": 0}
    r = api.post(f"/v1/workers/{w}/claim{qs}", json={"wait_s": 0, "done": done})
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["job"]["id"] == b["id"]
    assert api.get(f"/v1/jobs/{a['id']}").json()["status"] == "completed"
    assert api.get(f"/v1/runs/{first['run']['id']}").json()["status"] == "completed"

    # a resend of the same completion is answered the same (a retry after a lost answer)
    r = api.post(f"/v1/workers/{w}/claim{qs}", json={"wait_s": 0, "done": done})
    assert r.status_code == 204, r.text

    # a different word on an ended run: 409 naming `done`; the pending job stays pending
    c = api.post("/v1/jobs", json=job_body(script=f"echo c-{route}")).json()
    r = api.post(
        f"/v1/workers/{w}/claim{qs}",
        json={"wait_s": 0, "done": {**done, "status": "failed", "exit_code": 1}},
    )
    assert r.status_code == 409 and r.json()["error"]["param"] == "done", r.text
    assert api.get(f"/v1/jobs/{c['id']}").json()["status"] == "pending"
    # a run that does not exist: 404 naming `done.run_id`
    r = api.post(
        f"/v1/workers/{w}/claim{qs}", json={"wait_s": 0, "done": {**done, "run_id": 10**12}}
    )
    assert r.status_code == 404 and r.json()["error"]["param"] == "done.run_id", r.text
    # a malformed `done`: 422 naming the field; still nothing claimed
    r = api.post(
        f"/v1/workers/{w}/claim{qs}", json={"wait_s": 0, "done": {**done, "status": "great"}}
    )
    assert r.status_code == 422 and "done" in r.json()["error"]["param"], r.text
    assert api.get(f"/v1/jobs/{c['id']}").json()["status"] == "pending"
    # completing the second run with the claim that takes the third
    r = api.post(
        f"/v1/workers/{w}/claim{qs}",
        json={
            "wait_s": 0,
            "done": {"run_id": second["run"]["id"], "status": "failed", "exit_code": 2},
        },
    )
    assert r.status_code == 200 and r.json()["job"]["id"] == c["id"], r.text
    assert api.get(f"/v1/jobs/{b['id']}").json()["status"] == "failed"


def test_lost_lease_requeues_then_fences_the_old_run(api):
    w1, w2 = register(api), register(api)
    job = api.post("/v1/jobs", json=job_body(script="echo lease")).json()
    first = claim(api, w1)
    assert first["lease_s"] == LEASE_S
    # w1 goes silent; its lease lapses and the sweeper requeues the job
    wait_until(
        lambda: api.get(f"/v1/jobs/{job['id']}").json()["status"] == "pending", 20, "requeue"
    )
    second = claim(api, w2)
    assert second["job"]["id"] == job["id"] and second["run"]["attempt"] == 2
    old = first["run"]["id"]
    for method, path, kw in [
        ("POST", f"/v1/runs/{old}/heartbeat", {"json": {"wait_s": 0}}),
        ("POST", f"/v1/runs/{old}/logs?offset=0", {"content": b"zombie"}),
        ("POST", f"/v1/runs/{old}/complete", {"json": {"status": "completed", "exit_code": 0}}),
    ]:
        r = api.request(method, path, **kw)
        assert r.status_code == 409, (path, r.text)
    runs = api.get(f"/v1/jobs/{job['id']}/runs").json()["data"]
    assert runs[0]["status"] == "lost" and "lease expired" in runs[0]["error"]
    r = api.post(
        f"/v1/runs/{second['run']['id']}/complete", json={"status": "completed", "exit_code": 0}
    )
    assert r.status_code == 200
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "completed"


def test_job_fails_with_reason_after_max_attempts(api):
    w = register(api)
    job = api.post("/v1/jobs", json=job_body(script="echo poison", max_attempts=2)).json()
    for attempt in (1, 2):
        got = claim(api, w)
        assert got["run"]["attempt"] == attempt
        api.post(
            f"/v1/runs/{got['run']['id']}/complete",
            json={"status": "lost", "error": "worker stopping"},
        )
    final = api.get(f"/v1/jobs/{job['id']}").json()
    assert (
        final["status"] == "failed"
        and "2 attempt" in final["error"]
        and "worker stopping" in final["error"]
    )


def test_cancel_reaches_a_parked_heartbeat_at_once(api):
    w = register(api)
    job = api.post("/v1/jobs", json=job_body(script="sleep 100")).json()
    run = claim(api, w)["run"]["id"]
    import threading

    out = {}

    def beat():
        t0 = time.monotonic()
        out["hb"] = api.post(f"/v1/runs/{run}/heartbeat", json={"wait_s": 30}).json()
        out["elapsed"] = time.monotonic() - t0

    th = threading.Thread(target=beat)
    th.start()
    time.sleep(0.3)
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    th.join(30)
    assert out["hb"]["cancel"] is True and out["elapsed"] < 5
    r = api.post(f"/v1/runs/{run}/complete", json={"status": "canceled", "exit_code": -15})
    assert r.status_code == 200
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_logs_are_appended_once_and_become_a_file(api):
    w = register(api)
    job = api.post("/v1/jobs", json=job_body(script="echo logs")).json()
    got = claim(api, w)
    run = got["run"]["id"]
    assert api.post(f"/v1/runs/{run}/logs?offset=0", content=b"hello\n").json()["size"] == 6
    assert api.post(f"/v1/runs/{run}/logs?offset=0", content=b"hello\nworld\n").json()["size"] == 12
    assert api.post(f"/v1/runs/{run}/logs?offset=99", content=b"gap").status_code == 409
    assert api.get(f"/v1/runs/{run}/log").text == "hello\nworld\n"
    assert api.get(f"/v1/runs/{run}/log?offset=6").text == "world\n"
    api.post(
        f"/v1/runs/{run}/events",
        json={"events": [{"data": {"x": 1, "file": None}}, {"data": {"x": 2}}]},
        headers={"Authorization": f"Bearer {got['token']}"},
    )
    api.post(f"/v1/runs/{run}/complete", json={"status": "completed", "exit_code": 0})
    runs = api.get(f"/v1/jobs/{job['id']}/runs").json()["data"]
    assert api.get(f"/v1/files/{runs[-1]['log_file']}/content").text == "hello\nworld\n"
    assert api.get(f"/v1/runs/{run}/log?offset=6").text == "world\n"
    assert api.get(f"/v1/jobs/{job['id']}").json()["outputs"] == {"x": 2}
    events = api.get("/v1/events", params={"job_id": job["id"]}).json()["data"]
    assert [e["data"]["x"] for e in events] == [1, 2]


def test_run_token_is_scoped_to_its_own_run_and_revoked_when_it_ends(api):
    w = register(api)
    api.post("/v1/jobs", json=job_body(script="echo a"))
    api.post("/v1/jobs", json=job_body(script="echo b"))
    a, b = claim(api, w), None
    w2 = register(api)
    b = claim(api, w2)
    run_api = Api(str(api.base_url), a["token"])
    ev = {"events": [{"data": {"k": 1}}]}
    assert run_api.post(f"/v1/runs/{a['run']['id']}/events", json=ev).status_code == 200
    assert run_api.post(f"/v1/runs/{b['run']['id']}/events", json=ev).status_code == 403
    assert run_api.get("/v1/tokens").status_code == 403
    assert run_api.get("/v1/secrets").status_code == 403
    api.post(f"/v1/runs/{a['run']['id']}/complete", json={"status": "completed", "exit_code": 0})
    assert run_api.post(f"/v1/runs/{a['run']['id']}/events", json=ev).status_code == 401


def test_upload_is_validated_with_file_line_and_field_and_nothing_is_stored(api):
    bad = b'{"messages":[{"role":"user","content":"hi"}]}\n{"messages":[{"role":"bot","content":"x"}]}\n'
    r = api.post(
        "/v1/files", params={"purpose": "conversations", "filename": "train.jsonl"}, content=bad
    )
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "train.jsonl" in msg and "line 2" in msg and "role" in msg
    assert api.get("/v1/files").json()["data"] == []
    good = b'{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}\n'
    f1 = api.post(
        "/v1/files", params={"purpose": "conversations", "filename": "a.jsonl"}, content=good
    ).json()
    f2 = api.post(
        "/v1/files", params={"purpose": "conversations", "filename": "b.jsonl"}, content=good
    ).json()
    assert f1["id"] == f2["id"] and f1["id"].startswith("conversations:file-")
    assert api.get(f"/v1/files/{f1['id']}/content").content == good
    # OpenAI-style multipart upload
    r = api.post("/v1/files", data={"purpose": "result"}, files={"file": ("r.txt", b"abc")})
    assert r.status_code == 200 and r.json()["filename"] == "r.txt"
    assert api.post("/v1/files", params={"purpose": "nope"}, content=b"x").status_code == 400


def test_a_streamed_upload_is_stored_whole_or_not_at_all(server, api_key, api):
    """A body of several blocks in uneven pieces is stored byte for byte under its sha256; an
    upload cut short mid-body stores nothing and leaves no temporary file behind."""
    import hashlib
    import os
    import socket
    from urllib.parse import urlparse

    data = os.urandom(5 * (1 << 20) + 12345)
    sizes = iter([1, 70_000, 3 << 20, 999, 1 << 20] + [1 << 16] * 100)

    def body():
        at = 0
        while at < len(data):
            n = next(sizes)
            yield data[at : at + n]
            at += n

    r = api.post("/v1/files", params={"purpose": "result", "filename": "blob.bin"}, content=body())
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["bytes"] == len(data)
    got = api.get(f"/v1/files/{f['id']}/content")
    assert got.headers["x-openweights-sha256"] == hashlib.sha256(data).hexdigest()
    assert got.content == data
    before = {x["id"] for x in api.get("/v1/files", params={"limit": 1000}).json()["data"]}

    u = urlparse(server.url)
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(
            b"POST /v1/files?purpose=result&filename=cut.bin HTTP/1.1\r\n"
            + f"Host: {u.hostname}\r\nAuthorization: Bearer {api_key}\r\n".encode()
            + b"Content-Type: application/octet-stream\r\nContent-Length: 8388608\r\n\r\n"
        )
        s.sendall(os.urandom(3 << 20))
    tmp = server.home / "tmp"
    wait_until(lambda: not list(tmp.glob("upload-*")), 10, "the cut upload's spool file deleted")
    after = {x["id"] for x in api.get("/v1/files", params={"limit": 1000}).json()["data"]}
    assert after == before


def test_other_orgs_ids_look_like_missing_ones(server, api):
    w = register(api)
    job = api.post("/v1/jobs", json=job_body(script="echo mine")).json()
    got = claim(api, w)
    f = api.post(
        "/v1/files", params={"purpose": "result", "filename": "x"}, content=b"secret bytes"
    ).json()
    api.put("/v1/secrets/HF_TOKEN", json={"value": "hf_xyz"})
    tok = api.post("/v1/tokens", json={"name": "t"}).json()
    other = Api(server.url, server.signup("other"))
    run = got["run"]["id"]
    checks = [
        ("GET", f"/v1/jobs/{job['id']}", {}),
        ("GET", f"/v1/jobs/{job['id']}/runs", {}),
        ("GET", f"/v1/jobs/{job['id']}/wait?timeout_s=0", {}),
        ("POST", f"/v1/jobs/{job['id']}/cancel", {}),
        ("POST", f"/v1/jobs/{job['id']}/restart", {}),
        ("GET", f"/v1/runs/{run}", {}),
        ("GET", f"/v1/runs/{run}/log", {}),
        ("POST", f"/v1/runs/{run}/heartbeat", {"json": {"wait_s": 0}}),
        ("POST", f"/v1/runs/{run}/logs?offset=0", {"content": b"x"}),
        ("POST", f"/v1/runs/{run}/events", {"json": {"events": [{"data": {}}]}}),
        ("POST", f"/v1/runs/{run}/complete", {"json": {"status": "completed"}}),
        ("GET", f"/v1/events?run_id={run}", {}),
        ("GET", f"/v1/events?job_id={job['id']}", {}),
        ("GET", f"/v1/files/{f['id']}", {}),
        ("GET", f"/v1/files/{f['id']}/content", {}),
        ("POST", f"/v1/workers/{w}/claim", {"json": {"wait_s": 0}}),
        ("POST", f"/v1/workers/{w}/shutdown", {}),
        ("DELETE", f"/v1/tokens/{tok['id']}", {}),
        ("DELETE", "/v1/secrets/HF_TOKEN", {}),
    ]
    for method, path, kw in checks:
        r = other.request(method, path, **kw)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
    assert other.get("/v1/jobs").json()["data"] == []
    assert other.get("/v1/files").json()["data"] == []
    assert other.get("/v1/secrets").json()["data"] == []
    assert other.post("/v1/files/check", json={"ids": [f["id"]]}).json()["missing"] == [f["id"]]
    # and nothing changed for the owner
    assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "in_progress"


def test_tokens_can_be_revoked_and_expire(server, api):
    new = api.post("/v1/tokens", json={"name": "ci"}).json()
    assert new["token"].startswith("ow_") and new["prefix"] == new["token"][:10]
    listed = api.get("/v1/tokens").json()["data"]
    assert all(t["token"] is None for t in listed)
    other = Api(server.url, new["token"])
    assert other.get("/v1/me").status_code == 200
    api.delete(f"/v1/tokens/{new['id']}")
    r = other.get("/v1/me")
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert Api(server.url, "ow_nope").get("/v1/jobs").status_code == 401
    assert httpx.get(f"{server.url}/v1/jobs").status_code == 401
    worker_tok = api.post("/v1/tokens", json={"name": "w", "kind": "worker"}).json()["token"]
    wapi = Api(server.url, worker_tok)
    assert wapi.post("/v1/tokens", json={"name": "x"}).status_code == 403
    assert wapi.post("/v1/jobs", json=job_body()).status_code == 403
    assert wapi.post("/v1/workers", json={"name": "w"}).status_code == 200


def test_secrets_are_write_only_and_encrypted_at_rest(server, api):
    value = "hf_supersecretvalue_12345"
    api.post("/v1/secrets", json={"secrets": {"HF_TOKEN": value, "WANDB_API_KEY": "w"}})
    names = [s["name"] for s in api.get("/v1/secrets").json()["data"]]
    assert names == ["HF_TOKEN", "WANDB_API_KEY"]
    assert value not in api.get("/v1/secrets").text
    bad = api.put("/v1/secrets/bad-name", json={"value": "x"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "name"
    if server.backend == "sqlite":
        raw = b"".join(p.read_bytes() for p in server.home.glob("openweights.db*"))
        assert value.encode() not in raw
    w = register(api)
    api.post("/v1/jobs", json=job_body(script="echo env"))
    assert claim(api, w)["env"]["HF_TOKEN"] == value  # given to the org's jobs only


def test_every_error_is_json_with_a_message(server, api):
    for r in [
        api.get("/v1/jobs/nope"),
        api.get("/v1/nope"),
        api.post("/v1/jobs", json={"type": "custom"}),
        api.post("/v1/jobs", json=job_body(unknown=1)),
        api.get("/v1/jobs?limit=0"),
    ]:
        assert r.status_code in (404, 422), r.text
        err = r.json()["error"]
        assert err["message"] and err["type"]
    r = api.post("/v1/jobs", json=job_body(requires_vram_gb=-1))
    assert r.status_code == 422 and r.json()["error"]["param"] == "requires_vram_gb"


def test_ids_and_offsets_beyond_64_bits_are_refused_naming_the_parameter(api):
    """Found by schemathesis: a 27-digit run id reached the driver and overflowed (a 500)."""
    huge = 585601608322307290451410944
    for r, param in [
        (api.post(f"/v1/runs/{huge}/events", json={"events": [{"data": {}}]}), "run_id"),
        (api.post(f"/v1/runs/{huge}/complete", json={"status": "completed"}), "run_id"),
        (api.get(f"/v1/runs/{huge}"), "run_id"),
        (api.get("/v1/events", params={"run_id": huge}), "run_id"),
        (api.get("/v1/events", params={"job_id": "x", "after": huge}), "after"),
    ]:
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == param


def test_find_matches_validated_params(api):
    api.post(
        "/v1/jobs",
        json=job_body(
            params={"validated_params": {"model": "m1", "lr": 1, "cfg": {"x": 1, "y": 2}}}
        ),
    )
    api.post("/v1/jobs", json=job_body(params={"validated_params": {"model": "m2", "lr": 1}}))
    found = api.post("/v1/jobs/find", json={"params": {"lr": 1}}).json()["data"]
    assert len(found) == 2
    found = api.post("/v1/jobs/find", json={"params": {"model": "m1", "cfg": {"x": 1}}}).json()[
        "data"
    ]
    assert [j["params"]["validated_params"]["model"] for j in found] == ["m1"]


@pytest.mark.parametrize(
    ("want", "found"),
    [
        ({"lr": 1}, ["a", "c"]),  # 1 == 1.0, as JSON numbers
        ({"lr": 1.0}, ["a", "c"]),
        ({"flag": True}, ["a"]),  # a boolean is not the number 1
        ({"flag": 1}, ["b"]),
        ({"name": "x.y"}, ["a"]),
        ({"name": "1"}, []),  # a string is not a number
        ({"a.b": 2}, ["b"]),  # a key with a dot
        ({'q"k': 3}, ["c"]),  # a key a JSON path cannot name plainly
        ({"cfg": {"x": 1}}, ["a", "b"]),
        ({"cfg": {"x": 1, "y": None}}, ["b"]),
        ({"cfg": {"z": None}}, []),  # null is a value: the key must be there
        ({"layers": [2]}, ["a", "b"]),  # lists by containment
        ({"layers": [1, 3]}, ["a"]),
        ({"layers": [4]}, []),
        ({"big": 2**64}, ["c"]),  # beyond SQLite's integers
        ({"nope": "x"}, []),
        ({}, ["a", "b", "c"]),
    ],
)
def test_find_matches_as_json_containment_on_both_databases(api, want, found):
    """`find` answers as PostgreSQL's jsonb `@>` does, on both databases (SQLite matches the
    scalar values with its JSON functions first, then checks containment exactly)."""
    jobs = {
        "a": {"lr": 1, "flag": True, "name": "x.y", "cfg": {"x": 1}, "layers": [1, 2, 3]},
        "b": {"lr": 2, "flag": 1, "a.b": 2, "cfg": {"x": 1, "y": None}, "layers": [2]},
        "c": {"lr": 1.0, "flag": False, 'q"k': 3, "big": 2**64, "layers": "123"},
    }
    for name, vp in jobs.items():
        r = api.post("/v1/jobs", json=job_body(job_id_suffix=name, params={"validated_params": vp}))
        assert r.status_code == 200, r.text
    got = api.post("/v1/jobs/find", json={"params": want}).json()["data"]
    assert sorted(j["id"].rsplit("-", 1)[1] for j in got) == found


def test_find_and_list_filter_by_id_prefix_on_the_server(api, server, api_key):
    """One kind of custom job among many: `id_prefix` is applied by the server, before `limit`
    (so newer jobs of other kinds cannot push it off the page), `_` in it is a literal."""
    from openweights import OpenWeights

    vp = {"validated_params": {"x": 1}}
    mine = api.post("/v1/jobs", json=job_body(id_prefix="a_b", params=vp)).json()["id"]
    for i in range(5):  # newer jobs with the same params; `axb-` would match a LIKE 'a_b-%'
        api.post("/v1/jobs", json=job_body(id_prefix="axb", params=vp, job_id_suffix=str(i)))
    found = api.post("/v1/jobs/find", json={"params": {"x": 1}, "id_prefix": "a_b", "limit": 1})
    assert [j["id"] for j in found.json()["data"]] == [mine]
    page = api.get("/v1/jobs", params={"id_prefix": "a_b", "limit": 1}).json()
    assert [j["id"] for j in page["data"]] == [mine] and page["has_more"] is False
    assert len(api.get("/v1/jobs", params={"id_prefix": "axb"}).json()["data"]) == 5
    bad = api.get("/v1/jobs", params={"id_prefix": "A%"})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "id_prefix", bad.text
    ow = OpenWeights(base_url=server.url, api_key=api_key)
    assert [j.id for j in ow.jobs.find(id_prefix="a_b", limit=1, x=1)] == [mine]
    assert [j.id for j in ow.jobs.list(id_prefix="a_b", limit=1)] == [mine]


def test_an_integer_beyond_64_bits_is_kept_exact_on_every_create(api):
    """The first create of a token goes through the FastAPI route, later ones through the fast
    path: both keep params exactly (and so give one content hash)."""
    big = {"validated_params": {"seed": 2**64 + 1, "n": -(2**70)}}
    ids = []
    for suffix in (
        None,
        None,
        "again",
    ):  # the 1st through the route, the next through the fast path
        r = api.post("/v1/jobs", json=job_body(params=big, job_id_suffix=suffix))
        assert r.status_code == 200 and r.json()["params"] == big, r.text
        ids.append(r.json()["id"])
    assert ids[0] == ids[1] and ids[2] == ids[0] + "-again"
    got = api.get(f"/v1/jobs/{ids[2]}").json()
    assert got["params"] == big


def test_mass_assignment_and_oversized_bodies_are_refused(api):
    r = api.post(
        "/v1/jobs", json=job_body(org_id="org-other", status="completed", outputs={"x": 1})
    )
    assert r.status_code == 422 and "org_id" in r.json()["error"]["message"]
    r = api.post("/v1/tokens", json={"name": "t", "org_id": "org-other"})
    assert r.status_code == 422
    huge = {"type": "custom", "params": {"blob": "x" * (17 << 20)}, "script": "true"}
    r = api.post("/v1/jobs", json=huge)
    assert r.status_code == 413 and "POST /v1/files" in r.json()["error"]["message"]

    def chunked():
        for _ in range(20):
            yield b"x" * (1 << 20)

    r = api.post("/v1/jobs", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert api.get("/health").status_code == 200


def test_jobs_get_org_secrets_but_never_the_cluster_managers_own(api):
    api.post(
        "/v1/secrets",
        json={"secrets": {"HF_TOKEN": "hf_x", "RUNPOD_API_KEY": "rp_x", "OW_MAX_WORKERS": "3"}},
    )
    w = register(api)
    api.post("/v1/jobs", json=job_body(job_id_suffix="env"))
    got = claim(api, w)
    assert got["env"]["HF_TOKEN"] == "hf_x"
    assert "RUNPOD_API_KEY" not in got["env"] and "OW_MAX_WORKERS" not in got["env"]
    api.post(f"/v1/runs/{got['run']['id']}/complete", json={"status": "completed", "exit_code": 0})


def test_a_jobs_many_mounted_files_upload_together_sync_and_async(server, api_key, tmp_path):
    """The files the server lacks go `UPLOAD_CONCURRENCY` at a time (the large one alone): each
    stored with its bytes, under the id computed locally; a second call sends none; a file that
    cannot be read fails the call with its name (no upload left running)."""
    import asyncio

    from openweights import AsyncOpenWeights, OpenWeights, OpenWeightsError
    from openweights.client.files import PROGRESS_MIN_BYTES, file_id_of_path

    def tree(name: str) -> dict[str, Path]:
        d = tmp_path / name
        d.mkdir()
        paths = {}
        for i in range(40):
            p = d / f"m{i}.py"
            p.write_text(f"# {name} {i}\n" * (i + 1))
            paths[file_id_of_path("custom_job_file", p)] = p
        big = d / "weights.bin"
        big.write_bytes(name.encode() * (PROGRESS_MIN_BYTES // len(name) + 1))
        paths[file_id_of_path("custom_job_file", big)] = big
        return paths

    ow = OpenWeights(base_url=server.url, api_key=api_key)
    sync_paths, async_paths, gone = tree("sync"), tree("async"), tree("gone")
    victim = next(p for p in gone.values() if p.name == "m7.py")
    victim.unlink()  # after its id was computed, replaced by what cannot be read: the upload
    victim.mkdir()  # fails while the others are in flight
    assert ow.files._upload_paths(sync_paths, purpose="custom_job_file") == {
        f: f for f in sync_paths
    }
    with pytest.raises(OpenWeightsError, match="m7.py"):
        ow.files._upload_paths(gone, purpose="custom_job_file")

    async def in_async() -> None:
        async with AsyncOpenWeights(base_url=server.url, api_key=api_key) as aow:
            got = await aow.files._upload_paths(async_paths, purpose="custom_job_file")
            assert got == {f: f for f in async_paths}
            with pytest.raises(OpenWeightsError, match="m7.py"):
                await aow.files._upload_paths(gone, purpose="custom_job_file")
            for _ in range(5):  # the canceled uploads unwind
                await asyncio.sleep(0)
            assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()

    asyncio.run(in_async())
    for fid, p in {**sync_paths, **async_paths}.items():
        assert ow.files.content(fid) == p.read_bytes(), p
    assert ow.files.check(list(sync_paths) + list(async_paths)) == []
