"""SDK and CLI unit tests: a fake API behind `httpx.MockTransport`, no server.

End-to-end behaviour against a real server lives in the other test modules.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import io
import json
import re
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict

import openweights
from openweights import (
    APIConnectionError,
    AsyncOpenWeights,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    InvalidParamsError,
    JobFailedError,
    Jobs,
    NotFoundError,
    OpenWeights,
    OpenWeightsError,
    PermissionDeniedError,
    RateLimitError,
    Settings,
    UnprocessableEntityError,
    WaitTimeoutError,
    register,
)
from openweights.cli import _common
from openweights.cli.main import build_parser, main
from openweights.client import custom_job
from openweights.client._base import BaseHTTP
from openweights.client.events import AsyncEvents, Events
from openweights.client.files import AsyncFiles, Files, compute_file_id
from openweights.client.jobs import AsyncJob, AsyncJobsResource, Job, JobsResource
from openweights.client.runs import AsyncRunLogger, AsyncRuns, RunLogger, Runs
from openweights.client.secrets import AsyncSecrets, Secrets
from openweights.client.tokens import AsyncTokens, Tokens
from openweights.client.workers import AsyncWorkers, Workers

BASE = "http://ow.test"
T0 = 1_700_000_000.0

# ---------------------------------------------------------------- a fake API


class FakeAPI:
    """Routes `(METHOD, path regex)` to a JSON body, a Response, or a handler; records requests."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: list[tuple[str, re.Pattern[str], Any]] = []

    def on(self, method: str, path: str, answer: Any) -> FakeAPI:
        self.routes.insert(0, (method, re.compile(path), answer))  # later routes win
        return self

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        for method, pattern, answer in self.routes:
            m = pattern.fullmatch(request.url.path)
            if method == request.method and m:
                if callable(answer):
                    answer = answer(request, *m.groups())
                if isinstance(answer, httpx.Response):
                    return answer
                return httpx.Response(200, json=answer)
        return error(404, f"no route {request.method} {request.url.path}")

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]


def error(
    status: int, message: str, type_: str = "error", param: str | None = None
) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"type": type_, "message": message, "param": param}}
    )


def job_json(job_id: str = "job-abc123", status: str = "pending", **kw: Any) -> dict[str, Any]:
    body = {
        "id": job_id,
        "object": "job",
        "type": "custom",
        "status": status,
        "params": {"validated_params": {"a": 5, "b": 9}, "mounted_files": {}},
        "script": "python worker_side.py",
        "outputs": None,
        "created_at": T0,
        "updated_at": T0,
    }
    body.update(kw)
    return body


def run_json(run_id: int, job_id: str = "job-abc123", **kw: Any) -> dict[str, Any]:
    body = {
        "id": run_id,
        "object": "run",
        "job_id": job_id,
        "attempt": 1,
        "status": "completed",
        "started_at": T0,
        "log_file": None,
    }
    body.update(kw)
    return body


def file_json(file_id: str, filename: str = "f", size: int = 1) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "filename": filename,
        "purpose": file_id.split(":")[0],
        "bytes": size,
        "sha256": "0" * 64,
        "created_at": T0,
    }


def page(data: list[Any], has_more: bool = False) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("OPENWEIGHTS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OPENWEIGHTS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(BaseHTTP, "_retry_delay_s", staticmethod(lambda attempt, response: 0.0))


@pytest.fixture
def api() -> FakeAPI:
    return FakeAPI()


def client(api: FakeAPI, **kw: Any) -> OpenWeights:
    return OpenWeights(base_url=BASE, api_key="ow_test", transport=httpx.MockTransport(api), **kw)


def aclient(api: FakeAPI, **kw: Any) -> AsyncOpenWeights:
    return AsyncOpenWeights(
        base_url=BASE, api_key="ow_test", transport=httpx.MockTransport(api), **kw
    )


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (409, ConflictError),
        (422, UnprocessableEntityError),
        (429, RateLimitError),
        (500, InternalServerError),
        (503, InternalServerError),
    ],
)
def test_error_status_maps_to_class_with_server_message(
    api: FakeAPI, status: int, cls: type
) -> None:
    api.on("GET", "/v1/jobs/job-x", error(status, f"Job 'job-x' says {status}.", param="job_id"))
    ow = client(api, max_retries=0)
    with pytest.raises(cls) as info:
        ow.jobs.retrieve("job-x")
    assert f"Job 'job-x' says {status}." in str(info.value)
    assert info.value.status_code == status
    assert info.value.param == "job_id"


def test_transient_errors_are_retried_for_idempotent_requests(api: FakeAPI) -> None:
    answers = [error(503, "busy"), error(503, "busy"), httpx.Response(200, json=job_json())]
    api.on("GET", "/v1/jobs/job-abc123", lambda req: answers.pop(0))
    job = client(api, max_retries=3).jobs.retrieve("job-abc123")
    assert job.id == "job-abc123"
    assert len(api.requests) == 3


def test_connection_failure_raises_api_connection_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    ow = OpenWeights(
        base_url=BASE, api_key="k", transport=httpx.MockTransport(refuse), max_retries=1
    )
    with pytest.raises(APIConnectionError, match="ow.test"):
        ow.jobs.list()


def test_requests_carry_the_bearer_token(api: FakeAPI) -> None:
    api.on("GET", "/v1/jobs", page([]))
    client(api).jobs.list()
    assert api.requests[0].headers["authorization"] == "Bearer ow_test"


# ---------------------------------------------------------------- credentials


def test_url_without_key_names_the_env_var_and_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENWEIGHTS_URL", "http://remote:8124")
    with pytest.raises(OpenWeightsError) as info:
        OpenWeights()
    msg = str(info.value)
    assert "OPENWEIGHTS_API_KEY" in msg and "ow signup" in msg and "ow token create" in msg


def test_no_url_starts_or_attaches_to_the_embedded_service(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Settings] = []

    def ensure_running(settings: Settings) -> Any:
        calls.append(settings)
        return types.SimpleNamespace(url="http://127.0.0.1:9999/", api_key="ow_local")

    fake = types.ModuleType("openweights.service")
    fake.ensure_running = ensure_running  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "openweights.service", fake)
    monkeypatch.setattr(openweights, "service", fake, raising=False)
    ow = OpenWeights()
    assert (ow.base_url, ow.api_key) == ("http://127.0.0.1:9999", "ow_local")
    assert len(calls) == 1


def test_explicit_arguments_win_over_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENWEIGHTS_URL", "http://env:1")
    monkeypatch.setenv("OPENWEIGHTS_API_KEY", "ow_env")
    assert (OpenWeights().base_url, OpenWeights().api_key) == ("http://env:1", "ow_env")
    ow = OpenWeights(base_url="http://arg:2/v1/", api_key="ow_arg")
    assert (ow.base_url, ow.api_key) == ("http://arg:2", "ow_arg")


# ---------------------------------------------------------------- Job object


def test_job_has_attribute_and_item_access(api: FakeAPI) -> None:
    api.on(
        "GET",
        "/v1/jobs/job-abc123",
        job_json(status="completed", outputs={"file": "result:file-1"}),
    )
    job = client(api).jobs.retrieve("job-abc123")
    assert job.status == job["status"] == "completed"
    assert job["outputs"]["file"] == job.outputs["file"] == "result:file-1"
    assert job.params["validated_params"]["a"] == 5
    assert "status" in job and job.get("nope", 1) == 1
    assert dict(job)["id"] == "job-abc123"
    with pytest.raises(KeyError):
        job["refresh"]


def test_refresh_updates_in_place_and_returns_the_job(api: FakeAPI) -> None:
    states = iter(["pending", "in_progress", "completed"])
    api.on("GET", "/v1/jobs/job-abc123", lambda req: job_json(status=next(states)))
    job = client(api).jobs.retrieve("job-abc123")
    same = job.refresh()
    assert same is job and job.status == "in_progress"
    job = job.refresh()
    assert job.status == "completed" and job.done


def test_job_repr_and_str_are_readable(api: FakeAPI) -> None:
    api.on("GET", "/v1/jobs/job-abc123", job_json(status="failed", error="OOM"))
    job = client(api).jobs.retrieve("job-abc123")
    assert repr(job).startswith("Job(id='job-abc123'")
    text = str(job)
    assert "job-abc123" in text and "failed" in text and "OOM" in text


def test_job_runs_are_oldest_first_with_log_file(api: FakeAPI) -> None:
    api.on("GET", "/v1/jobs/job-abc123", job_json())
    api.on(
        "GET",
        "/v1/jobs/job-abc123/runs",
        page(
            [run_json(1, status="lost"), run_json(2, attempt=2, log_file="log:file-aaaaaaaaaaaa")]
        ),
    )
    job = client(api).jobs.retrieve("job-abc123")
    assert [r.id for r in job.runs] == [1, 2]
    assert job.runs[-1].log_file == job.runs[-1]["log_file"] == "log:file-aaaaaaaaaaaa"


def test_cancel_and_restart_update_the_job(api: FakeAPI) -> None:
    api.on("GET", "/v1/jobs/job-abc123", job_json())
    api.on("POST", "/v1/jobs/job-abc123/cancel", job_json(status="canceled"))
    api.on("POST", "/v1/jobs/job-abc123/restart", job_json(status="pending"))
    job = client(api).jobs.retrieve("job-abc123")
    assert job.cancel() is job and job.status == "canceled"
    assert job.restart().status == "pending"


def test_wait_long_polls_until_terminal(api: FakeAPI) -> None:
    states = iter(["pending", "in_progress", "completed"])
    api.on("GET", "/v1/jobs/job-abc123/wait", lambda req: job_json(status=next(states)))
    job = client(api).jobs.wait("job-abc123")
    assert job.status == "completed"
    waits = api.sent("GET", "/v1/jobs/job-abc123/wait")
    assert len(waits) == 3
    assert waits[0].url.params["until"] == "terminal"
    assert 0 < int(waits[0].url.params["timeout_s"]) <= 60


def test_job_wait_raise_on_failure(api: FakeAPI) -> None:
    api.on("GET", "/v1/jobs/job-abc123", job_json())
    api.on("GET", "/v1/jobs/job-abc123/wait", job_json(status="failed", error="exit code 3"))
    job = client(api).jobs.retrieve("job-abc123")
    assert job.wait().status == "failed"  # no raise by default
    with pytest.raises(JobFailedError, match="exit code 3"):
        job.wait(raise_on_failure=True)


def test_wait_times_out_with_a_reason(api: FakeAPI) -> None:
    api.on("GET", "/v1/jobs/job-abc123/wait", job_json(pending_reason="no worker has 80 GB"))
    with pytest.raises(WaitTimeoutError, match="no worker has 80 GB"):
        client(api).jobs.wait("job-abc123", timeout=0.05)


def test_find_sends_params_type_and_status(api: FakeAPI) -> None:
    api.on("POST", "/v1/jobs/find", page([job_json()]))
    jobs = client(api).jobs.find(model="unsloth/Qwen3-4B", meta={"group": "x"}, status="completed")
    body = json.loads(api.requests[0].content)
    assert body == {
        "params": {"model": "unsloth/Qwen3-4B", "meta": {"group": "x"}},
        "status": "completed",
        "limit": 100,
    }
    assert jobs[0].id == "job-abc123"


def test_list_pages_with_after(api: FakeAPI) -> None:
    def jobs(request: httpx.Request) -> dict[str, Any]:
        if request.url.params.get("after") == "job-2":
            return page([job_json("job-3")])
        return page([job_json("job-1"), job_json("job-2")], has_more=True)

    api.on("GET", "/v1/jobs", jobs)
    assert [j.id for j in client(api).jobs.list(status="pending", limit=3)] == [
        "job-1",
        "job-2",
        "job-3",
    ]
    assert api.requests[0].url.params["status"] == "pending"


def test_job_download_writes_logs_and_results_inside_dir(api: FakeAPI, tmp_path: Path) -> None:
    api.on("GET", "/v1/jobs/job-abc123", job_json(status="completed"))
    api.on(
        "GET",
        "/v1/jobs/job-abc123/runs",
        page(
            [
                run_json(1, log_file="log:file-111111111111"),
                run_json(2, log_file="log:file-222222222222"),
            ]
        ),
    )
    api.on(
        "GET",
        "/v1/events",
        page(
            [
                {
                    "id": 1,
                    "run_id": 2,
                    "job_id": "job-abc123",
                    "created_at": T0,
                    "file": None,
                    "data": {"path": "out/result.txt", "file": "result:file-aaaaaaaaaaaa"},
                },
                {
                    "id": 2,
                    "run_id": 2,
                    "job_id": "job-abc123",
                    "created_at": T0,
                    "file": "result:file-bbbbbbbbbbbb",
                    "data": {"path": "../../escape.txt"},
                },
                {
                    "id": 3,
                    "run_id": 2,
                    "job_id": "job-abc123",
                    "created_at": T0,
                    "file": None,
                    "data": {"loss": 0.1},
                },
            ]
        ),
    )
    api.on(
        "GET", r"/v1/files/(.+)/content", lambda req, fid: httpx.Response(200, content=fid.encode())
    )
    job = client(api).jobs.retrieve("job-abc123")
    written = job.download(tmp_path / "out")
    root = tmp_path / "out"
    assert (root / "logs" / "2.log").read_bytes() == b"log:file-222222222222"
    assert (root / "out" / "result.txt").read_bytes() == b"result:file-aaaaaaaaaaaa"
    assert (root / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()
    assert not (root / "logs" / "1.log").exists()  # only the last run by default
    assert len(written) == 3
    assert api.requests[-1].url.path.endswith("/content")
    assert any(r.url.params.get("run_id") == "2" for r in api.sent("GET", "/v1/events"))


# ---------------------------------------------------------------- files


def test_upload_streams_the_file_as_raw_body(api: FakeAPI, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"messages": []}\n')
    fid = compute_file_id("conversations", path.read_bytes())
    api.on("POST", "/v1/files", file_json(fid, "train.jsonl"))
    f = client(api).files.upload(path, purpose="conversations")
    assert f["id"] == f.id == fid
    req = api.requests[0]
    assert (
        req.url.params["purpose"] == "conversations" and req.url.params["filename"] == "train.jsonl"
    )
    assert req.headers["content-type"] == "application/octet-stream"
    assert req.headers["content-length"] == str(path.stat().st_size)
    assert "transfer-encoding" not in req.headers
    assert req.content == path.read_bytes()


def test_streamed_upload_is_resent_whole_after_a_dropped_connection(
    api: FakeAPI, tmp_path: Path
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"0123456789" * 1000)
    answers: list[Any] = [error(503, "restarting")]
    api.on(
        "POST",
        "/v1/files",
        lambda req: (
            answers.pop(0) if answers else file_json(compute_file_id("result", req.content))
        ),
    )
    f = client(api).files.upload(path, purpose="result")
    assert [r.content for r in api.requests] == [path.read_bytes()] * 2
    assert f.id == compute_file_id("result", path.read_bytes())


def test_big_upload_is_skipped_when_the_server_has_the_bytes(api: FakeAPI, tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * (9 << 20))
    fid = "custom_job_file:file-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    api.on("POST", "/v1/files/check", {"missing": []})
    api.on("GET", f"/v1/files/{fid}", file_json(fid, "big.bin", 9 << 20))
    f = client(api).files.upload(path, purpose="custom_job_file")
    assert f.id == fid
    assert json.loads(api.requests[0].content) == {"ids": [fid]}
    assert not api.sent("POST", "/v1/files")


def test_create_accepts_file_objects_and_bytes(api: FakeAPI, tmp_path: Path) -> None:
    path = tmp_path / "mydata.jsonl"
    path.write_bytes(b"abc")
    api.on(
        "POST", "/v1/files", lambda req: file_json(compute_file_id("conversations", req.content))
    )
    ow = client(api)
    with open(path, "rb") as fh:
        assert ow.files.create(file=fh, purpose="conversations")["id"] == compute_file_id(
            "conversations", b"abc"
        )
    assert api.requests[-1].url.params["filename"] == "mydata.jsonl"
    ow.files.create(file=b"xyz", purpose="conversations")
    assert api.requests[-1].content == b"xyz"


def test_content_and_download(api: FakeAPI, tmp_path: Path) -> None:
    api.on("GET", "/v1/files/result:file-1/content", httpx.Response(200, content=b"hello"))
    ow = client(api)
    assert ow.files.content("result:file-1") == b"hello"
    dest = ow.files.download("result:file-1", tmp_path / "a" / "b.txt")
    assert dest.read_bytes() == b"hello"
    assert [p.name for p in dest.parent.iterdir()] == ["b.txt"]  # no temp file left


def test_check_returns_missing_ids(api: FakeAPI) -> None:
    api.on("POST", "/v1/files/check", lambda req: {"missing": json.loads(req.content)["ids"][1:]})
    assert client(api).files.check(["a:file-1", "a:file-2"]) == ["a:file-2"]


# ---------------------------------------------------------------- events and ow.run


def _event(i: int) -> dict[str, Any]:
    return {"id": i, "run_id": 1, "job_id": "j", "data": {"i": i}, "file": None, "created_at": T0}


def test_events_list_pages_through_everything(api: FakeAPI) -> None:
    def events(request: httpx.Request) -> dict[str, Any]:
        if request.url.params.get("after") == "2":
            return page([_event(3)])
        return page([_event(1), _event(2)], has_more=True)

    api.on("GET", "/v1/events", events)
    got = client(api).events.list(run_id=1)
    assert [e["data"]["i"] for e in got] == [1, 2, 3]
    assert api.requests[0].url.params["run_id"] == "1"


def test_run_log_outside_a_job_explains_itself(api: FakeAPI) -> None:
    with pytest.raises(OpenWeightsError, match="only works inside a job"):
        client(api).run.log({"x": 1})


def test_run_log_posts_one_event_at_once(api: FakeAPI) -> None:
    api.on("POST", "/v1/runs/7/events", {"count": 1})
    ow = client(api, settings=Settings(run_id=7, job_id="job-abc123"))
    ow.run.log({"loss": 0.5})
    ow.run.log_many([{"step": 1}, {"step": 2}])
    bodies = [json.loads(r.content) for r in api.requests]
    assert bodies == [
        {"events": [{"data": {"loss": 0.5}}]},
        {"events": [{"data": {"step": 1}}, {"data": {"step": 2}}]},
    ]
    assert ow.run.id == 7


# ---------------------------------------------------------------- custom jobs


class AddParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: float
    b: float


@pytest.fixture
def registry() -> Any:
    before = dict(custom_job._REGISTRY)
    yield custom_job._REGISTRY
    custom_job._REGISTRY.clear()
    custom_job._REGISTRY.update(before)


def _addition_kind(tmp_path: Path) -> tuple[type[Jobs], Path, Path]:
    script = tmp_path / "worker_side.py"
    script.write_text("print('hi')\n")
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg" / "m.py").write_text("x = 1\n")
    for junk in (".git", "__pycache__", "myenv"):
        (lib / junk).mkdir()
        (lib / junk / "f.py").write_text("junk")
    (lib / "myenv" / "pyvenv.cfg").write_text("")
    (lib / "pkg" / "m.pyc").write_bytes(b"\0")

    class AdditionJob(Jobs):
        mount = {str(script): "worker_side.py", str(lib) + "/": "lib/"}
        params = AddParams
        requires_vram_gb = 0
        base_image = "me/ow-image"

        def get_entrypoint(self, validated_params: AddParams) -> str:
            return f"python worker_side.py '{json.dumps(validated_params.model_dump())}'"

    return AdditionJob, script, lib / "pkg" / "m.py"


def _job_echo(request: httpx.Request) -> dict[str, Any]:
    body = json.loads(request.content)
    return job_json(
        f"{body['id_prefix']}-0123456789ab", params=body["params"], script=body["script"]
    )


def test_custom_job_create_uploads_only_missing_mounts(
    api: FakeAPI, tmp_path: Path, registry: Any
) -> None:
    kind, script, module = _addition_kind(tmp_path)
    ow_before = client(api)
    register("addition_unit")(kind)
    script_id = compute_file_id("custom_job_file", script.read_bytes())
    module_id = compute_file_id("custom_job_file", module.read_bytes())
    api.on("POST", "/v1/files/check", {"missing": [script_id]})
    api.on(
        "POST", "/v1/files", lambda req: file_json(compute_file_id("custom_job_file", req.content))
    )
    api.on("POST", "/v1/jobs", _job_echo)

    job = ow_before.addition_unit.create(a=5, b=9, job_id_suffix="v1", allowed_hardware=["1x H100"])

    assert set(json.loads(api.sent("POST", "/v1/files/check")[0].content)["ids"]) == {
        script_id,
        module_id,
    }
    uploads = api.sent("POST", "/v1/files")
    assert len(uploads) == 1 and uploads[0].content == script.read_bytes()
    assert uploads[0].url.params["purpose"] == "custom_job_file"
    body = json.loads(api.sent("POST", "/v1/jobs")[0].content)
    assert body == {
        "type": "custom",
        "id_prefix": "additionjob",
        "params": {
            "validated_params": {"a": 5.0, "b": 9.0},
            "mounted_files": {"worker_side.py": script_id, "lib/pkg/m.py": module_id},
        },
        "script": 'python worker_side.py \'{"a": 5.0, "b": 9.0}\'',
        "requires_vram_gb": 0,
        "allowed_hardware": ["1x H100"],
        "docker_image": "me/ow-image",
        "job_id_suffix": "v1",
    }
    assert job.id == "additionjob-0123456789ab" and isinstance(job, Job)


def test_custom_job_request_is_canonical_and_skips_known_files(
    api: FakeAPI, tmp_path: Path, registry: Any
) -> None:
    kind, _, _ = _addition_kind(tmp_path)
    register("addition_unit")(kind)
    api.on("POST", "/v1/files/check", {"missing": []})
    api.on("POST", "/v1/jobs", _job_echo)
    ow = client(api)  # created after register: bound too
    ow.addition_unit.create(a=5, b=9)
    ow.addition_unit.create(b=9, a=5)
    first, second = (json.loads(r.content) for r in api.sent("POST", "/v1/jobs"))
    assert first == second
    assert not api.sent("POST", "/v1/files")
    assert first["requires_vram_gb"] == 0 and "job_id_suffix" not in first


def test_custom_job_invalid_params_name_the_field(
    api: FakeAPI, tmp_path: Path, registry: Any
) -> None:
    kind, _, _ = _addition_kind(tmp_path)
    register("addition_unit")(kind)
    ow = client(api)
    with pytest.raises(InvalidParamsError) as info:
        ow.addition_unit.create(a=5, c=1)
    assert "b: Field required" in str(info.value) and "c: Extra inputs" in str(info.value)
    assert api.requests == []  # nothing uploaded or submitted


def test_register_rejects_names_the_client_uses(registry: Any) -> None:
    with pytest.raises(ValueError, match="taken"):
        register("files")
    with pytest.raises(TypeError):
        register("not_a_kind")(object)


def test_custom_job_on_async_client(api: FakeAPI, tmp_path: Path, registry: Any) -> None:
    kind, _, _ = _addition_kind(tmp_path)
    register("addition_unit")(kind)
    api.on("POST", "/v1/files/check", lambda req: {"missing": json.loads(req.content)["ids"]})
    api.on(
        "POST", "/v1/files", lambda req: file_json(compute_file_id("custom_job_file", req.content))
    )
    api.on("POST", "/v1/jobs", _job_echo)
    api.on(
        "GET",
        "/v1/jobs/additionjob-0123456789ab",
        lambda req: job_json("additionjob-0123456789ab", status="completed"),
    )

    async def go() -> AsyncJob:
        async with aclient(api) as aow:
            job = await aow.addition_unit.create(a=1, b=2)
            assert isinstance(job, AsyncJob)
            return await job.refresh()

    job = asyncio.run(go())
    assert job.status == "completed"
    assert len(api.sent("POST", "/v1/files")) == 2


def test_mount_targets_must_stay_inside_the_job_dir(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("")
    with pytest.raises(OpenWeightsError, match="relative"):
        custom_job.expand_mounts({str(tmp_path / "a.py"): "../a.py"})
    with pytest.raises(OpenWeightsError, match="does not exist"):
        custom_job.expand_mounts({str(tmp_path / "missing.py"): "a.py"})


# ---------------------------------------------------------------- sync/async parity

TWINS = [
    (Files, AsyncFiles),
    (JobsResource, AsyncJobsResource),
    (Runs, AsyncRuns),
    (Events, AsyncEvents),
    (Tokens, AsyncTokens),
    (Secrets, AsyncSecrets),
    (Workers, AsyncWorkers),
    (RunLogger, AsyncRunLogger),
    (Job, AsyncJob),
    (OpenWeights, AsyncOpenWeights),
]


def _public(cls: type) -> dict[str, Any]:
    """Public methods and properties, without pydantic's own (`model_*`) machinery."""
    return {
        name: inspect.getattr_static(cls, name)
        for name in dir(cls)
        if (not name.startswith("_") or name == "__init__")
        and not (issubclass(cls, BaseModel) and hasattr(BaseModel, name))
    }


def _shape(fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize(("sync_cls", "async_cls"), TWINS, ids=lambda c: c.__name__)
def test_sync_and_async_twins_have_the_same_public_methods(sync_cls: type, async_cls: type) -> None:
    sync, asyn = _public(sync_cls), _public(async_cls)
    assert set(sync) == set(asyn)
    for name, s in sync.items():
        a = asyn[name]
        if s is a:
            continue  # shared, I/O-free
        if isinstance(s, property):
            assert isinstance(a, property), name
            continue
        if isinstance(s, staticmethod | classmethod):
            s, a = s.__func__, a.__func__
        if not inspect.isfunction(s):
            continue
        assert _shape(s) == _shape(a), f"{sync_cls.__name__}.{name}"
        if name != "__init__" and not inspect.isgeneratorfunction(s):
            assert inspect.iscoroutinefunction(a), f"{async_cls.__name__}.{name} is not async"
        if inspect.isgeneratorfunction(s):
            assert inspect.isasyncgenfunction(a), f"{async_cls.__name__}.{name}"


# ---------------------------------------------------------------- light imports


def _run_python(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_import_openweights_imports_nothing_heavy() -> None:
    out = _run_python(
        "import sys, openweights; print(sorted(m for m in ('httpx', 'pydantic', 'tqdm') if m in sys.modules))"
    )
    assert out == "[]"


def test_client_path_does_not_import_the_server() -> None:
    out = _run_python(
        "import sys; from openweights import OpenWeights, register, Jobs; "
        "print(sorted(m for m in ('fastapi', 'sqlalchemy', 'uvicorn', 'starlette', 'tqdm') if m in sys.modules))"
    )
    assert out == "[]"


def test_cli_help_imports_no_client() -> None:
    out = _run_python(
        "import sys; from openweights.cli.main import build_parser; build_parser().format_help(); "
        "print(sorted(m for m in ('httpx', 'pydantic', 'openweights.client') if m in sys.modules))"
    )
    assert out == "[]"


def test_lazy_exports_resolve() -> None:
    for name in openweights.__all__:
        assert getattr(openweights, name) is not None
    with pytest.raises(AttributeError):
        openweights.nope  # noqa: B018


# ---------------------------------------------------------------- CLI


def _subcommands(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subcommands(sub, prefix + [name])
    return found


@pytest.mark.parametrize("argv", _subcommands(build_parser(), []), ids=" ".join)
def test_help_works_for_every_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ow") and len(out) > 80


@pytest.fixture
def cli(api: FakeAPI, monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    monkeypatch.setattr(_common, "make_client", lambda: client(api))

    def run(*argv: str, tty: bool = False, stdin: str | None = None) -> int:
        monkeypatch.setattr(_common, "stdout_is_tty", lambda: tty)
        monkeypatch.setattr(_common, "stdin_is_tty", lambda: stdin is None)
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        return main(list(argv))

    return run


def _jobs_page(api: FakeAPI) -> None:
    api.on(
        "GET",
        "/v1/jobs",
        page(
            [job_json("job-1", model="unsloth/Qwen3-4B"), job_json("job-2", status="in_progress")]
        ),
    )


def test_ls_prints_ids_only_when_piped(
    api: FakeAPI, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _jobs_page(api)
    assert cli("ls", "--status", "pending", "--limit", "5") == 0
    assert capsys.readouterr().out == "job-1\njob-2\n"
    assert api.requests[0].url.params["status"] == "pending"
    assert api.requests[0].url.params["limit"] == "5"


def test_ls_prints_a_table_on_a_terminal(
    api: FakeAPI, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _jobs_page(api)
    assert cli("ls", tty=True) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "STATUS", "CREATED", "MODEL"]
    assert lines[1].split()[0] == "job-1" and "unsloth/Qwen3-4B" in lines[1]
    assert "in_progress" in lines[2]


def test_cancel_reads_ids_from_stdin_and_skips_finished_jobs(
    api: FakeAPI, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("POST", "/v1/jobs/job-1/cancel", job_json("job-1", status="canceled"))
    api.on(
        "POST", "/v1/jobs/job-2/cancel", error(409, "Job 'job-2' is completed; cannot cancel it.")
    )
    api.on("GET", "/v1/jobs/job-2", job_json("job-2", status="completed"))
    assert cli("cancel", stdin="job-1\njob-2\n") == 0
    out, err = capsys.readouterr()
    assert out == "job-1\n"
    assert "skipped job-2: already completed" in err


def test_api_errors_print_one_line_and_exit_1(
    api: FakeAPI, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/v1/jobs", error(401, "Invalid API key."))
    assert cli("ls") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Invalid API key.") and err.count("\n") == 1
    assert "Traceback" not in err


def test_logs_prints_the_latest_run(
    api: FakeAPI, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/v1/jobs/job-1/runs", page([run_json(1, "job-1"), run_json(2, "job-1")]))
    api.on("GET", "/v1/runs/2/log", httpx.Response(200, text="step 1\nstep 2\n"))
    assert cli("logs", "job-1") == 0
    assert capsys.readouterr().out == "step 1\nstep 2\n"


def test_logs_follow_streams_until_the_run_ends(
    api: FakeAPI, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on("GET", "/v1/jobs/job-1", job_json("job-1", status="in_progress"))
    api.on("GET", "/v1/jobs/job-1/runs", page([run_json(3, "job-1", status="in_progress")]))
    api.on("GET", "/v1/runs/3/log", httpx.Response(200, text="live line\n"))
    api.on("GET", "/v1/runs/3", run_json(3, "job-1", status="completed"))
    # the job ends after this run
    seen = {"n": 0}

    def job(request: httpx.Request) -> dict[str, Any]:
        seen["n"] += 1
        return job_json("job-1", status="in_progress" if seen["n"] == 1 else "completed")

    api.on("GET", "/v1/jobs/job-1", job)
    assert cli("logs", "job-1", "-f") == 0
    assert capsys.readouterr().out == "live line\n"
    assert api.sent("GET", "/v1/runs/3/log")[0].url.params["follow"] == "true"


def test_env_import_parses_dotenv(api: FakeAPI, cli: Any, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "# secrets\nHF_TOKEN=hf_123\nexport WANDB_API_KEY='w k'  \nQUOTED=\"a\\nb\" # note\nPLAIN=x # c\n\n"
    )
    api.on("POST", "/v1/secrets", page([]))
    assert cli("env", "import", str(env), "-y") == 0
    assert json.loads(api.requests[0].content) == {
        "secrets": {"HF_TOKEN": "hf_123", "WANDB_API_KEY": "w k", "QUOTED": "a\nb", "PLAIN": "x"}
    }


def test_env_import_without_terminal_needs_yes(api: FakeAPI, cli: Any, tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("A=1\n")
    assert cli("env", "import", str(env), stdin="") == 1
    assert api.requests == []


def test_token_create_prints_only_the_secret_when_piped(
    api: FakeAPI, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    api.on(
        "POST",
        "/v1/tokens",
        {
            "id": "tok-1",
            "name": "ci",
            "kind": "worker",
            "prefix": "ow_ab",
            "created_at": T0,
            "token": "ow_secret",
        },
    )
    assert cli("token", "create", "--name", "ci", "--kind", "worker") == 0
    assert capsys.readouterr().out == "ow_secret\n"
    assert json.loads(api.requests[0].content) == {"name": "ci", "kind": "worker"}


def test_dotenv_rejects_malformed_lines() -> None:
    with pytest.raises(_common.CLIError, match="x.env:2"):
        _common.parse_dotenv("A=1\nnot a pair\n", source="x.env")


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: Any) -> None:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)


def test_worker_command_loads_env_file_and_passes_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[dict[str, Any]] = []
    _fake_module(monkeypatch, "openweights.worker", run_worker=lambda **kw: calls.append(kw) or 0)
    for name in ("OPENWEIGHTS_URL", "OPENWEIGHTS_API_KEY", "HF_TOKEN"):
        monkeypatch.setenv(name, "")  # --env-file writes os.environ: undo it after the test
        monkeypatch.delenv(name)
    env = tmp_path / "w.env"
    env.write_text("OPENWEIGHTS_URL=http://srv:8124\nOPENWEIGHTS_API_KEY=ow_worker\nHF_TOKEN=hf\n")
    assert main(["worker", "--env-file", str(env), "--any-hardware", "--max-jobs", "2"]) == 0
    assert calls == [
        {
            "url": "http://srv:8124",
            "token": "ow_worker",
            "name": None,
            "any_hardware": True,
            "docker_image": None,
            "max_jobs": 2,
            "workdir": None,
        }
    ]
    assert __import__("os").environ["HF_TOKEN"] == "hf"


def test_worker_command_without_url_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_module(monkeypatch, "openweights.worker", run_worker=lambda **kw: 0)
    assert main(["worker"]) == 1
    assert "ow token create --kind worker" in capsys.readouterr().err


def test_serve_and_service_commands_call_their_modules(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    served: list[dict[str, Any]] = []
    _fake_module(monkeypatch, "openweights.server", serve=lambda **kw: served.append(kw))
    _fake_module(
        monkeypatch,
        "openweights.service",
        status=lambda settings: {
            "running": True,
            "url": "http://127.0.0.1:1",
            "pid": 42,
            "workers": 2,
        },
        ensure_running=lambda settings: types.SimpleNamespace(
            url="http://127.0.0.1:1", api_key="k"
        ),
        stop=lambda settings: True,
    )
    assert main(["serve", "--port", "9000"]) == 0
    assert served == [{"host": "0.0.0.0", "port": 9000}]
    assert main(["service", "status"]) == 0
    assert "running: True" in capsys.readouterr().out
    assert main(["service", "restart"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "openweights service stopped",
        "openweights service running at http://127.0.0.1:1",
    ]


def test_deployment_keepalive_thread_ends_quietly_when_its_client_is_closed(api, monkeypatch):
    import threading

    from openweights.client.api import API

    hits: list[str] = []
    crashes: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashes.append(args.exc_value))

    def keepalive(request: httpx.Request) -> httpx.Response:
        hits.append(request.url.path)
        return httpx.Response(200, json={})

    ow = OpenWeights(base_url=BASE, api_key="ow_test", transport=httpx.MockTransport(keepalive))
    deployment = API(ow, {"model": "m", "idle_timeout_s": 0.1})  # a keepalive every 0.5 s
    deployment.job_id = "apijob-1"
    deployment._start_keepalive()
    deadline = time.monotonic() + 10
    while not hits and time.monotonic() < deadline:
        deployment._keeper.join(0.05)
    assert hits == ["/v1/deployments/apijob-1/keepalive"]
    ow.close()
    deployment._keeper.join(5)
    assert not deployment._keeper.is_alive()
    assert crashes == []  # no "client has been closed" traceback from the thread
