"""Worker pieces that need no real server: hardware, env, mounts, log shipping, kills, run flow.

The run-flow tests drive the real worker code against an in-process fake of the HTTP contract in
docs/internals.md, swapped in through `httpx.MockTransport`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from openweights._settings import Settings
from openweights.client._base import SyncHTTP
from openweights.types import ClaimResponse, Hardware
from openweights.worker import Worker
from openweights.worker._env import build_job_env
from openweights.worker._logship import LogShipper
from openweights.worker._mounts import MountError, download_mounts, safe_join
from openweights.worker._process import group_alive, spawn_job, terminate_group
from openweights.worker.hardware import (
    gpu_short_name,
    hardware_from_gpus,
    parse_nvidia_smi,
    probe_hardware,
)

URL = "http://ow.test"
WORKER_TOKEN = "ow_worker_secret_123"
RUN_TOKEN = "ow_run_secret_456"


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition"
) -> None:
    """Poll a condition with a deadline (no fixed sleeps in tests)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---- fake server --------------------------------------------------------------------------------
def _error(
    status: int, message: str, type_: str = "error", param: str | None = None
) -> httpx.Response:
    body = {"error": {"type": type_, "message": message, "param": param}}
    return httpx.Response(status, json=body)


class FakeServer:
    """Enough of the run/worker API to drive a worker: records every call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []
        self.auth: list[str | None] = []
        self.log = bytearray()
        self.log_posts: list[tuple[int, int]] = []
        self.log_failures: list[str] = []  # "503" or "connect", consumed one per log post
        self.log_status: int | None = None  # answer every log post with this status
        self.files: dict[str, bytes] = {}
        self.uploads: list[tuple[str, str, bytes]] = []  # (purpose, filename, bytes)
        self.event_batches: list[list[dict[str, Any]]] = []
        self.completes: list[dict[str, Any]] = []
        self.claims: list[dict[str, Any]] = []
        self.claim_ready = threading.Event()
        self.cancel = threading.Event()
        self.fence = False
        self.heartbeats = 0
        self.shutdowns = 0
        self.register_failures = 0
        self.refuse_done = False  # answer a claim's `done` with 409 (another attempt won)
        self.claim_failures = 0  # claims answered with a dropped connection, after the first
        self.token_on_register: str | None = None
        self.transport = httpx.MockTransport(self.handle)

    def add_claim(self, claim: dict[str, Any]) -> None:
        with self.lock:
            self.claims.append(claim)
        self.claim_ready.set()

    def handle(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        query = {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}
        with self.lock:
            self.calls.append((method, path))
            self.auth.append(request.headers.get("authorization"))
        if method == "POST" and path == "/v1/workers":
            if self.register_failures > 0:
                self.register_failures -= 1
                raise httpx.ConnectError("connection refused", request=request)
            return httpx.Response(200, json=_worker_json() | {"token": self.token_on_register})
        if m := re.fullmatch(r"/v1/workers/(\w+)/claim", path):
            body = json.loads(request.content)
            wait_s = body["wait_s"]
            if self.claim_failures > 0 and self.calls_to("/claim") > 1:
                self.claim_failures -= 1
                raise httpx.ConnectError("connection reset", request=request)
            if "done" in body:  # the previous run's completion rides with the claim
                if self.fence or self.refuse_done:
                    return _error(409, "fenced", "fenced", param="done")
                with self.lock:
                    self.completes.append({k: v for k, v in body["done"].items() if k != "run_id"})
            self.claim_ready.wait(wait_s)
            with self.lock:
                if self.claims:
                    claim = self.claims.pop(0)
                    if not self.claims:
                        self.claim_ready.clear()
                    return httpx.Response(200, json=claim)
            return httpx.Response(204)
        if re.fullmatch(r"/v1/workers/(\w+)/shutdown", path):
            self.shutdowns += 1
            return httpx.Response(200, json=_worker_json(status="shutdown"))
        if m := re.fullmatch(r"/v1/runs/(\d+)/heartbeat", path):
            self.heartbeats += 1
            if self.fence:
                return _error(409, "run is no longer live", "fenced")
            wait_s = json.loads(request.content)["wait_s"]
            self.cancel.wait(wait_s)
            return httpx.Response(
                200, json={"cancel": self.cancel.is_set(), "lease_expires_at": time.time() + 3}
            )
        if m := re.fullmatch(r"/v1/runs/(\d+)/logs", path):
            return self._logs(request, int(query["offset"]))
        if m := re.fullmatch(r"/v1/files/(.+)/content", path):
            file_id = m.group(1)
            if file_id not in self.files:
                return _error(404, f"file {file_id} not found")
            return httpx.Response(200, content=self.files[file_id])
        if method == "POST" and path == "/v1/files":
            data = request.read()
            file_id = f"result:file-{len(self.files):012d}"
            with self.lock:
                self.files[file_id] = data
                self.uploads.append((query["purpose"], query["filename"], data))
            return httpx.Response(200, json=_file_json(file_id, query["filename"], len(data)))
        if m := re.fullmatch(r"/v1/runs/(\d+)/events", path):
            if self.fence:
                return _error(409, "fenced", "fenced")
            events = json.loads(request.content)["events"]
            with self.lock:
                self.event_batches.append(events)
            return httpx.Response(200, json={"count": len(events)})
        if m := re.fullmatch(r"/v1/runs/(\d+)/complete", path):
            if self.fence:
                return _error(409, "fenced", "fenced")
            body = json.loads(request.content)
            with self.lock:
                self.completes.append(body)
            return httpx.Response(200, json=_run_json(int(m.group(1)), status=body["status"]))
        return _error(404, f"no route {method} {path}")

    def _logs(self, request: httpx.Request, offset: int) -> httpx.Response:
        data = request.read()
        with self.lock:
            if self.log_failures:
                kind = self.log_failures.pop(0)
                if kind == "connect":
                    raise httpx.ConnectError("connection reset", request=request)
                return _error(503, "try again")
            if self.log_status is not None:
                return _error(self.log_status, "no")
            self.log_posts.append((offset, len(data)))
            if offset > len(self.log):
                return _error(409, f"log has {len(self.log)} bytes: gap", "conflict")
            end = offset + len(data)
            if end > len(self.log):
                self.log += data[len(self.log) - offset :]
            return httpx.Response(200, json={"size": len(self.log)})

    def calls_to(self, suffix: str) -> int:
        with self.lock:
            return sum(1 for _, p in self.calls if p.endswith(suffix))


def _worker_json(status: str = "active") -> dict[str, Any]:
    return {
        "id": "w1",
        "name": "test",
        "status": status,
        "hardware": Hardware().model_dump(),
        "last_seen_at": time.time(),
        "created_at": time.time(),
    }


def _file_json(file_id: str, filename: str, size: int) -> dict[str, Any]:
    return {
        "id": file_id,
        "filename": filename,
        "purpose": "result",
        "bytes": size,
        "sha256": "0" * 64,
        "created_at": time.time(),
    }


def _run_json(run_id: int, status: str = "in_progress") -> dict[str, Any]:
    return {
        "id": run_id,
        "job_id": "job-abc",
        "attempt": 1,
        "status": status,
        "started_at": time.time(),
    }


def make_claim(
    script: str,
    *,
    run_id: int = 7,
    mounts: dict[str, str] | None = None,
    timeout_s: float | None = None,
    lease_s: float = 3.0,
) -> dict[str, Any]:
    now = time.time()
    job = {
        "id": f"job-{run_id}",
        "type": "custom",
        "status": "in_progress",
        "params": {"validated_params": {}, "mounted_files": mounts or {}},
        "script": script,
        "created_at": now,
        "updated_at": now,
        "timeout_s": timeout_s,
    }
    return {
        "run": _run_json(run_id) | {"job_id": job["id"]},
        "job": job,
        "token": RUN_TOKEN,
        "env": {"HF_TOKEN": "hf_org_secret"},
        "lease_s": lease_s,
    }


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


def make_worker(fake: FakeServer, tmp_path: Path, **kwargs: Any) -> Worker:
    options: dict[str, Any] = {
        "url": URL,
        "token": WORKER_TOKEN,
        "workdir": tmp_path / "work",
        "hardware": Hardware(),
        "settings": Settings(home=tmp_path / "home"),
        "transport": fake.transport,
        "cancel_grace_s": 1.0,
        "claim_wait_s": 1.0,
        "max_jobs": 1,
    }
    options.update(kwargs)
    return Worker(**options)


# ---- hardware -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H100 NVL", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("NVIDIA GeForce RTX 3090", "RTX3090"),
        ("NVIDIA RTX A6000", "A6000"),
        ("NVIDIA RTX 6000 Ada Generation", "6000Ada"),
        ("NVIDIA A10G", "A10G"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-32GB", "V100"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA Frobnicator X9", "FROBNICATOR"),
    ],
)
def test_gpu_names_map_to_short_types(name: str, short: str) -> None:
    assert gpu_short_name(name) == short


def test_nvidia_smi_rows_become_hardware_with_total_vram() -> None:
    text = "".join(f"{i}, GPU-{i:04d}-aaaa, NVIDIA H100 80GB HBM3, 81559\n" for i in range(8))
    gpus = parse_nvidia_smi(text)
    assert [g.index for g in gpus] == list(range(8))
    hw = hardware_from_gpus(gpus, cpu_count=64, memory_gb=1000.0)
    assert hw.gpu_type == "H100"
    assert hw.gpu_count == 8
    assert hw.hardware_type == "8x H100"
    # decimal GB: an "80GB" card satisfies requires_vram_gb=80
    assert hw.vram_gb == pytest.approx(8 * 85.5, abs=0.5)
    assert hw.cpu_count == 64


def test_nvidia_smi_two_column_output_and_garbage_lines() -> None:
    gpus = parse_nvidia_smi("NVIDIA GeForce RTX 4090, 24564\n\nnot a gpu line\n")
    assert len(gpus) == 1
    hw = hardware_from_gpus(gpus, cpu_count=8, memory_gb=64)
    assert hw.hardware_type == "1x RTX4090"
    assert hw.vram_gb >= 24


def test_cpu_only_hardware_when_no_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("openweights.worker.hardware.shutil.which", lambda _: None)
    hw = probe_hardware({})
    assert hw.hardware_type == "cpu"
    assert hw.gpu_count == 0 and hw.vram_gb == 0 and hw.gpu_type is None
    assert hw.cpu_count >= 1
    assert hw.memory_gb > 0


def _fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}EOF\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_probe_runs_nvidia_smi_and_honours_cuda_visible_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = (
        "0, GPU-aaaa, NVIDIA A100-SXM4-80GB, 81920\n"
        "1, GPU-bbbb, NVIDIA A100-SXM4-80GB, 81920\n"
        "2, GPU-cccc, NVIDIA A100-SXM4-80GB, 81920\n"
    )
    _fake_nvidia_smi(tmp_path, monkeypatch, rows)
    assert probe_hardware({}).hardware_type == "3x A100"
    pinned = probe_hardware({"CUDA_VISIBLE_DEVICES": "2,0"})
    assert pinned.hardware_type == "2x A100"
    assert pinned.vram_gb == pytest.approx(2 * 85.9, abs=0.2)
    assert probe_hardware({"CUDA_VISIBLE_DEVICES": "GPU-bbbb"}).gpu_count == 1
    assert probe_hardware({"CUDA_VISIBLE_DEVICES": ""}).hardware_type == "cpu"
    assert probe_hardware({"CUDA_VISIBLE_DEVICES": "-1"}).hardware_type == "cpu"


# ---- env ----------------------------------------------------------------------------------------
def test_job_env_drops_worker_secrets_and_adds_run_identity() -> None:
    claim = ClaimResponse.model_validate(make_claim("true", run_id=42))
    base = {
        "PATH": "/usr/bin",
        "HOME": "/home/w",
        "OPENWEIGHTS_API_KEY": WORKER_TOKEN,
        "OPENWEIGHTS_DATABASE_URL": "postgresql://u:pw@db/ow",
        "OPENWEIGHTS_SECRET_KEY": "fernet",
        "RUNPOD_API_KEY": "rp_secret",
        "SOME_ALIAS_OF_THE_TOKEN": WORKER_TOKEN,
        "CUDA_VISIBLE_DEVICES": "1",
    }
    env = build_job_env(base, claim, url=URL, n_gpus=2, worker_tokens=[WORKER_TOKEN])
    assert env["OPENWEIGHTS_API_KEY"] == RUN_TOKEN
    assert env["OPENWEIGHTS_URL"] == URL
    assert env["OPENWEIGHTS_RUN_ID"] == "42"
    assert env["OPENWEIGHTS_JOB_ID"] == "job-42"
    assert env["N_GPUS"] == "2"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["HF_TOKEN"] == "hf_org_secret"
    assert env["HOME"] == "/home/w" and env["CUDA_VISIBLE_DEVICES"] == "1"
    for gone in ("RUNPOD_API_KEY", "OPENWEIGHTS_DATABASE_URL", "OPENWEIGHTS_SECRET_KEY"):
        assert gone not in env
    assert "SOME_ALIAS_OF_THE_TOKEN" not in env
    assert WORKER_TOKEN not in env.values()
    assert env["PATH"].split(os.pathsep) == [os.path.dirname(sys.executable), "/usr/bin"]


def test_org_secret_cannot_override_run_token() -> None:
    claim_json = make_claim("true")
    claim_json["env"]["OPENWEIGHTS_API_KEY"] = "ow_user_token_from_an_imported_env_file"
    env = build_job_env({}, ClaimResponse.model_validate(claim_json), url=URL, n_gpus=0)
    assert env["OPENWEIGHTS_API_KEY"] == RUN_TOKEN
    assert env["PATH"] == os.path.dirname(sys.executable)


# ---- mounts -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad", ["../x", "/etc/passwd", "a/../../x", "", ".", "dir/", "~/x", "a\\..\\x", "a/\x00"]
)
def test_mount_paths_that_escape_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(MountError):
        safe_join(tmp_path, bad)


def test_mount_paths_inside_are_accepted(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "a/b/script.py") == tmp_path / "a" / "b" / "script.py"
    assert safe_join(tmp_path, "./x.py") == tmp_path / "x.py"


def test_mount_through_symlink_out_of_run_dir_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(MountError):
        safe_join(root, "link/evil.py")


def test_download_mounts_creates_dirs_and_refuses_before_writing(
    tmp_path: Path, fake: FakeServer
) -> None:
    fake.files = {"custom_job_file:file-1": b"print('hi')\n", "custom_job_file:file-2": b"data"}
    http = SyncHTTP(URL, RUN_TOKEN, max_retries=0, transport=fake.transport)
    total = download_mounts(
        http,
        tmp_path,
        {"script.py": "custom_job_file:file-1", "d/e/f.txt": "custom_job_file:file-2"},
    )
    assert total == len(b"print('hi')\n") + 4
    assert (tmp_path / "script.py").read_bytes() == b"print('hi')\n"
    assert (tmp_path / "d" / "e" / "f.txt").read_bytes() == b"data"
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(MountError):
        download_mounts(http, other, {"ok.py": "custom_job_file:file-1", "../bad": "x"})
    assert list(other.iterdir()) == []  # validated all before downloading any
    with pytest.raises(MountError) as err:
        download_mounts(http, other, {"missing.py": "custom_job_file:nope"})
    assert not err.value.infra


# ---- log shipping -------------------------------------------------------------------------------
def _shipper(fake: FakeServer, tmp_path: Path, **kwargs: Any) -> tuple[LogShipper, int]:
    read_fd, write_fd = os.pipe()
    http = SyncHTTP(URL, WORKER_TOKEN, max_retries=0, transport=fake.transport)
    shipper = LogShipper(http, 7, os.fdopen(read_fd, "rb"), tmp_path / "run.log", **kwargs)
    return shipper.start(), write_fd


def test_log_shipper_batches_lines_and_keeps_offsets_contiguous(
    tmp_path: Path, fake: FakeServer
) -> None:
    shipper, fd = _shipper(fake, tmp_path)
    expected = b"".join(f"line {i}\n".encode() for i in range(5000))
    for i in range(5000):
        os.write(fd, f"line {i}\n".encode())
    os.close(fd)
    assert shipper.close(flush_timeout_s=10)
    assert bytes(fake.log) == expected
    assert (tmp_path / "run.log").read_bytes() == expected
    assert len(fake.log_posts) < 20  # batched, never one request per line
    offset = 0
    for post_offset, length in fake.log_posts:
        assert post_offset == offset
        offset += length


def test_log_shipper_flushes_small_output_on_its_timer(tmp_path: Path, fake: FakeServer) -> None:
    shipper, fd = _shipper(fake, tmp_path, flush_interval_s=0.2)
    os.write(fd, b"hello\n")
    wait_until(lambda: bytes(fake.log) == b"hello\n", 5, "timer flush")  # pipe still open
    os.write(fd, b"x" * (200 * 1024))  # past the batch size: ships without waiting
    wait_until(lambda: len(fake.log) == 6 + 200 * 1024, 5, "size flush")
    os.close(fd)
    assert shipper.close()
    assert all(length <= 1024 * 1024 for _, length in fake.log_posts)


def test_log_shipper_retries_the_same_offset_after_errors(tmp_path: Path, fake: FakeServer) -> None:
    fake.log_failures = ["503", "connect", "503"]
    shipper, fd = _shipper(fake, tmp_path, flush_interval_s=0.05)
    os.write(fd, b"first\n")
    wait_until(lambda: bytes(fake.log) == b"first\n", 15, "retry")
    os.write(fd, b"second\n")
    os.close(fd)
    assert shipper.close()
    assert bytes(fake.log) == b"first\nsecond\n"
    assert fake.log_failures == []
    assert [o for o, _ in fake.log_posts] == [0, 6]


def test_log_shipper_resyncs_when_the_server_lost_bytes(tmp_path: Path, fake: FakeServer) -> None:
    shipper, fd = _shipper(fake, tmp_path, flush_interval_s=0.05)
    os.write(fd, b"one\ntwo\n")
    wait_until(lambda: bytes(fake.log) == b"one\ntwo\n", 5, "first batch")
    with fake.lock:
        del fake.log[4:]  # e.g. a database failover lost the last chunk
    os.write(fd, b"three\n")  # offset 8 > 4: the server answers 409 "conflict", not "fenced"
    os.close(fd)
    assert shipper.close(flush_timeout_s=10)
    assert bytes(fake.log) == b"one\ntwo\nthree\n"


def test_log_shipper_reports_fencing_on_409(tmp_path: Path, fake: FakeServer) -> None:
    fake.log_status = 409
    fenced = threading.Event()
    shipper, fd = _shipper(fake, tmp_path, on_fenced=fenced.set, flush_interval_s=0.05)
    os.write(fd, b"zombie output\n")
    assert fenced.wait(5)
    os.close(fd)
    assert not shipper.close(flush_timeout_s=1)


def test_log_tail_starts_at_a_line(tmp_path: Path, fake: FakeServer) -> None:
    shipper, fd = _shipper(fake, tmp_path)
    os.write(fd, b"".join(f"row {i:05d}\n".encode() for i in range(1000)))
    os.close(fd)
    shipper.close()
    tail = shipper.tail(100)
    assert tail.endswith("row 00999\n")
    assert tail.startswith("row ")
    assert len(tail) <= 100


# ---- process group kill -------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_term_ignoring_job_and_its_child_are_killed_after_grace(tmp_path: Path) -> None:
    proc = spawn_job("trap '' TERM; sleep 100 & echo $!; wait", cwd=tmp_path, env=dict(os.environ))
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    assert _pid_alive(child)
    started = time.monotonic()
    forced = terminate_group(proc, grace_s=0.5)
    elapsed = time.monotonic() - started
    assert forced
    assert elapsed >= 0.5
    assert proc.returncode == -signal.SIGKILL
    wait_until(lambda: not _pid_alive(child), 5, "child death")
    assert not group_alive(proc.pid)


def test_cooperative_job_stops_on_sigterm_without_sigkill(tmp_path: Path) -> None:
    proc = spawn_job("sleep 100 & echo $!; wait", cwd=tmp_path, env=dict(os.environ))
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    started = time.monotonic()
    assert not terminate_group(proc, grace_s=10)
    assert time.monotonic() - started < 5
    wait_until(lambda: not _pid_alive(child), 5, "child death")


# ---- whole runs against the fake server ---------------------------------------------------------
def test_job_runs_with_mounts_uploads_and_reports_completed(
    tmp_path: Path, fake: FakeServer
) -> None:
    fake.files["custom_job_file:file-in"] = b"mounted content\n"
    script = (
        "cat data/in.txt; "
        'echo "key=$OPENWEIGHTS_API_KEY run=$OPENWEIGHTS_RUN_ID job=$OPENWEIGHTS_JOB_ID gpus=$N_GPUS"; '
        'echo "runpod=${RUNPOD_API_KEY:-none} hf=$HF_TOKEN"; '
        "python -c \"import sys; print('py=' + sys.executable)\"; "
        "mkdir -p uploads/sub && echo result > uploads/sub/out.txt && echo a > uploads/a.txt"
    )
    fake.add_claim(make_claim(script, mounts={"data/in.txt": "custom_job_file:file-in"}))
    worker = make_worker(fake, tmp_path)
    assert worker.run() == 0

    log = fake.log.decode()
    assert "mounted content" in log
    assert f"key={RUN_TOKEN} run=7 job=job-7 gpus=0" in log
    assert "runpod=none hf=hf_org_secret" in log
    assert f"py={sys.executable}" in log or "py=" + os.path.realpath(sys.executable) in log
    assert WORKER_TOKEN not in log
    assert sorted((p, f) for p, f, _ in fake.uploads) == [
        ("result", "uploads/a.txt"),
        ("result", "uploads/sub/out.txt"),
    ]
    assert len(fake.event_batches) == 1  # one batch for all uploads
    paths = [e["data"]["path"] for e in fake.event_batches[0]]
    assert paths == ["uploads/a.txt", "uploads/sub/out.txt"]
    assert all(e["file"] == e["data"]["file"] for e in fake.event_batches[0])
    assert fake.completes == [{"status": "completed", "exit_code": 0, "error": None}]
    assert fake.shutdowns == 1
    assert not (tmp_path / "work" / "run-7").exists()  # cleaned
    assert worker.results[0].accepted


def test_failing_job_reports_exit_code_and_log_tail(tmp_path: Path, fake: FakeServer) -> None:
    fake.add_claim(make_claim("echo 'Traceback: boom'; exit 3"))
    worker = make_worker(fake, tmp_path)
    assert worker.run() == 0
    (complete,) = fake.completes
    assert complete["status"] == "failed"
    assert complete["exit_code"] == 3
    assert complete["error"].startswith("exit code 3")
    assert "Traceback: boom" in complete["error"]
    assert not worker.results[0].infra_failure


def test_cancel_stops_the_job_quickly_and_reports_canceled(
    tmp_path: Path, fake: FakeServer
) -> None:
    fake.add_claim(make_claim("echo started; sleep 100"))
    worker = make_worker(fake, tmp_path)
    canceler = threading.Thread(
        target=lambda: (wait_until(lambda: b"started" in fake.log, 10, "start"), fake.cancel.set())
    )
    canceler.start()
    started = time.monotonic()
    assert worker.run() == 0
    canceler.join()
    assert time.monotonic() - started < 10
    (complete,) = fake.completes
    assert complete["status"] == "canceled"
    assert fake.uploads == []


def test_fenced_run_is_killed_and_not_reported(tmp_path: Path, fake: FakeServer) -> None:
    marker = tmp_path / "still-running"
    fake.add_claim(make_claim(f"echo started; sleep 100; touch {marker}"))
    worker = make_worker(fake, tmp_path)
    fencer = threading.Thread(
        target=lambda: (
            wait_until(lambda: b"started" in fake.log, 10, "start"),
            setattr(fake, "fence", True),
        )
    )
    fencer.start()
    assert worker.run() == 0
    fencer.join()
    assert fake.completes == []
    assert fake.event_batches == []
    assert worker.results[0].fenced
    assert worker.results[0].status is None


def test_job_past_timeout_fails_with_deadline(tmp_path: Path, fake: FakeServer) -> None:
    fake.add_claim(make_claim("trap '' TERM; echo started; sleep 100", timeout_s=0.5))
    worker = make_worker(fake, tmp_path, cancel_grace_s=0.2)
    assert worker.run() == 0
    (complete,) = fake.completes
    assert complete["status"] == "failed"
    assert complete["error"].startswith("deadline:")
    assert complete["exit_code"] == 128 + signal.SIGKILL


def test_stop_during_a_job_gives_it_back_as_lost(tmp_path: Path, fake: FakeServer) -> None:
    fake.add_claim(make_claim("echo started; sleep 100"))
    worker = make_worker(fake, tmp_path, shutdown_grace_s=0.3, max_jobs=None)
    stopper = threading.Thread(
        target=lambda: (
            wait_until(lambda: b"started" in fake.log, 10, "start"),
            worker.request_stop("test"),
        )
    )
    stopper.start()
    assert worker.run() == 0
    stopper.join()
    (complete,) = fake.completes
    assert complete["status"] == "lost"
    assert fake.shutdowns == 1


def test_stop_lets_a_short_job_finish_within_grace(tmp_path: Path, fake: FakeServer) -> None:
    release = tmp_path / "release"
    fake.add_claim(
        make_claim(f"echo started; while [ ! -e {release} ]; do sleep 0.05; done; echo finished")
    )
    worker = make_worker(fake, tmp_path, shutdown_grace_s=30, max_jobs=None)

    def stop_then_release() -> None:
        wait_until(lambda: b"started" in fake.log, 10, "start")
        worker.request_stop("test")
        release.touch()

    stopper = threading.Thread(target=stop_then_release)
    stopper.start()
    assert worker.run() == 0
    stopper.join()
    assert fake.completes == [{"status": "completed", "exit_code": 0, "error": None}]
    assert b"finished" in fake.log


def test_a_completion_rides_with_the_next_claim(tmp_path: Path, fake: FakeServer) -> None:
    """One round trip per job: a worker that goes on claiming tells the server how its last run
    ended in that claim's `done`, not in a separate `POST /v1/runs/{id}/complete`."""
    fake.add_claim(make_claim("echo one"))
    fake.add_claim(make_claim("exit 4", run_id=8))
    worker = make_worker(fake, tmp_path, idle_exit_s=1.0, max_jobs=None)
    assert worker.run() == 0
    assert fake.calls_to("/complete") == 0
    assert [c["status"] for c in fake.completes] == ["completed", "failed"]
    assert [r.accepted for r in worker.results] == [True, True]
    assert [r.deferred.run_id for r in worker.results if r.deferred] == [7, 8]


def test_a_refused_done_marks_the_run_fenced_and_claiming_goes_on(
    tmp_path: Path, fake: FakeServer
) -> None:
    fake.refuse_done = True
    fake.add_claim(make_claim("echo one"))
    worker = make_worker(fake, tmp_path, idle_exit_s=0.5, max_jobs=None)
    assert worker.run() == 0
    assert worker.results[0].fenced and not worker.results[0].accepted
    assert fake.completes == [] and fake.calls_to("/complete") == 0
    assert fake.calls_to("/claim") >= 3  # it claimed again after the refusal


def test_a_stopping_worker_reports_an_untold_completion_itself(
    tmp_path: Path, fake: FakeServer
) -> None:
    """The claim carrying `done` never reaches the server; the worker stops: it posts the
    completion on its own before it goes."""
    fake.claim_failures = 1000
    fake.add_claim(make_claim("echo one"))
    worker = make_worker(fake, tmp_path, max_jobs=None)
    stopper = threading.Thread(
        target=lambda: (
            wait_until(lambda: fake.calls_to("/claim") >= 2, 10, "a failed claim with done"),
            worker.request_stop("test"),
        )
    )
    stopper.start()
    assert worker.run() == 0
    stopper.join()
    assert fake.calls_to("/complete") == 1
    assert fake.completes == [{"status": "completed", "exit_code": 0, "error": None}]
    assert worker.results[0].accepted


def test_worker_exits_when_idle_and_survives_an_unreachable_server(
    tmp_path: Path, fake: FakeServer
) -> None:
    fake.register_failures = 2
    worker = make_worker(fake, tmp_path, idle_exit_s=0.3, max_jobs=None)
    assert worker.run() == 0
    assert fake.calls_to("/v1/workers") == 3
    assert fake.shutdowns == 1
    assert fake.completes == []


def test_bad_mount_fails_the_job_without_running_it(tmp_path: Path, fake: FakeServer) -> None:
    marker = tmp_path / "ran"
    fake.add_claim(make_claim(f"touch {marker}", mounts={"../../etc/x": "custom_job_file:f"}))
    worker = make_worker(fake, tmp_path)
    assert worker.run() == 0
    (complete,) = fake.completes
    assert complete["status"] == "failed"
    assert complete["error"].startswith("mount:")
    assert not marker.exists()


def test_worker_uses_the_run_token_only_for_job_data(tmp_path: Path, fake: FakeServer) -> None:
    fake.files["custom_job_file:m"] = b"m"
    fake.add_claim(
        make_claim(
            "mkdir -p uploads && echo x > uploads/x.txt", mounts={"m.txt": "custom_job_file:m"}
        )
    )
    assert make_worker(fake, tmp_path).run() == 0
    with fake.lock:
        by_path = list(zip(fake.calls, fake.auth, strict=True))
    for (_, path), auth in by_path:
        expected = RUN_TOKEN if path == "/v1/files" or path.endswith("/events") else WORKER_TOKEN
        assert auth == f"Bearer {expected}", path


def test_worker_switches_to_the_token_minted_at_registration(
    tmp_path: Path, fake: FakeServer
) -> None:
    fake.token_on_register = "ow_minted_worker_token"
    fake.add_claim(make_claim("echo hi"))
    assert make_worker(fake, tmp_path).run() == 0
    with fake.lock:
        calls = list(zip(fake.calls, fake.auth, strict=True))
    assert calls[0] == (("POST", "/v1/workers"), f"Bearer {WORKER_TOKEN}")
    claim_auth = {a for (_, p), a in calls if p.endswith("/claim") or p.endswith("/complete")}
    assert claim_auth == {"Bearer ow_minted_worker_token"}


# ---- the real process over real HTTP ------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    """Serves a FakeServer over real HTTP, so the worker runs as it does in production."""

    protocol_version = "HTTP/1.1"
    server: _FakeHTTPServer

    def _handle(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            # Our uploads must send a length: not every proxy accepts chunked request bodies.
            self.send_response(411)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = httpx.Request(
            self.command, f"http://fake{self.path}", headers=dict(self.headers), content=body
        )
        try:
            response = self.server.fake.handle(request)
        except httpx.ConnectError:
            self.close_connection = True
            return
        content = response.read()
        self.send_response(response.status_code)
        if "content-type" in response.headers:
            self.send_header("Content-Type", response.headers["content-type"])
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeServer


@pytest.fixture
def http_fake(fake: FakeServer) -> Iterator[tuple[FakeServer, str]]:
    server = _FakeHTTPServer(("127.0.0.1", 0), _Handler)
    server.fake = fake
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _start_worker_process(
    url: str, tmp_path: Path, *args: str
) -> tuple[subprocess.Popen[bytes], Path]:
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENWEIGHTS_")}
    env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
    env["OPENWEIGHTS_HOME"] = str(tmp_path / "home")
    stderr_path = tmp_path / "worker.stderr"
    cmd = [sys.executable, "-m", "openweights.worker", "--url", url, "--token", WORKER_TOKEN]
    cmd += ["--workdir", str(tmp_path / "work"), *args]
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    return proc, stderr_path


def test_worker_process_streams_uploads_over_real_http(
    tmp_path: Path, http_fake: tuple[FakeServer, str]
) -> None:
    fake, url = http_fake
    script = (
        "mkdir -p uploads && head -c 3000000 /dev/zero | tr '\\0' 'x' > uploads/big.bin; echo done"
    )
    fake.add_claim(make_claim(script))
    proc, stderr = _start_worker_process(url, tmp_path, "--max-jobs", "1")
    assert proc.wait(timeout=60) == 0, stderr.read_text()
    ((purpose, filename, data),) = fake.uploads
    assert (purpose, filename) == ("result", "uploads/big.bin")
    assert data == b"x" * 3_000_000
    assert fake.completes == [{"status": "completed", "exit_code": 0, "error": None}]
    assert b"done" in fake.log
    assert fake.shutdowns == 1


def test_sigterm_gives_the_running_job_back_and_exits_zero(
    tmp_path: Path, http_fake: tuple[FakeServer, str]
) -> None:
    fake, url = http_fake
    fake.add_claim(make_claim("echo started; sleep 100"))
    proc, stderr = _start_worker_process(
        url, tmp_path, "--shutdown-grace-s", "0.5", "--cancel-grace-s", "0.5"
    )
    try:
        wait_until(lambda: b"started" in fake.log, 30, "job start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, stderr.read_text()
    finally:
        proc.kill()
    assert [c["status"] for c in fake.completes] == ["lost"]
    assert fake.shutdowns == 1


def test_second_signal_exits_at_once_and_kills_the_job(
    tmp_path: Path, http_fake: tuple[FakeServer, str]
) -> None:
    fake, url = http_fake
    fake.add_claim(make_claim("trap '' TERM; sleep 100 & echo child=$!; wait"))
    proc, stderr = _start_worker_process(url, tmp_path, "--shutdown-grace-s", "60")
    try:
        wait_until(lambda: b"child=" in fake.log, 30, "job start")
        child = int(re.search(rb"child=(\d+)", bytes(fake.log)).group(1))  # type: ignore[union-attr]
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: b"waiting up to" in stderr.read_bytes(), 10, "first signal handled")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 5
    finally:
        proc.kill()
    wait_until(lambda: not _pid_alive(child), 5, "job child death")
    assert fake.completes == []


def test_sigterm_while_idle_exits_without_waiting_for_the_long_poll(
    tmp_path: Path, http_fake: tuple[FakeServer, str]
) -> None:
    fake, url = http_fake
    proc, stderr = _start_worker_process(url, tmp_path)
    try:
        wait_until(lambda: fake.calls_to("/claim") >= 1, 30, "first claim")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, stderr.read_text()
        assert time.monotonic() - started < 10  # the claim long-polls 30 s
    finally:
        proc.kill()
    assert fake.shutdowns == 1


def test_cached_models_lists_hub_cache_and_registry_models_jobs_fetched(tmp_path):
    from openweights.worker.hardware import model_cache_dir, probe_cached_models

    (tmp_path / "hf" / "hub" / "models--Qwen--Qwen3-4B").mkdir(parents=True)
    cache = tmp_path / "home" / "models"
    (cache / "abc123").mkdir(parents=True)
    (cache / "abc123" / ".complete").write_text("lab/tiny-ft-ftjob-1")
    (cache / ".partial-x").mkdir()  # an interrupted download is not a cached model
    env = {"HF_HOME": str(tmp_path / "hf"), "OPENWEIGHTS_HOME": str(tmp_path / "home")}
    assert model_cache_dir(env) == cache
    assert probe_cached_models(env) == ["Qwen/Qwen3-4B", "lab/tiny-ft-ftjob-1"]
    env["OPENWEIGHTS_MODEL_CACHE"] = str(tmp_path / "elsewhere")
    assert probe_cached_models(env) == ["Qwen/Qwen3-4B"]
