"""Real processes over HTTP: a server (SQLite + local blobs, or PostgreSQL + S3 via moto) and
worker processes, driven through the public client."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from openweights.testing.server import ServerProcess, clean_env
from tests._infra import MotoS3, PostgresCluster

ROOT = Path(__file__).resolve().parent.parent
LEASE_S = 3.0

#: Modules that run torch, in two groups. Under `pytest -n 2 --dist loadgroup` (the default, see
#: pyproject.toml) each group runs whole on one xdist worker, its tests one at a time: two
#: trainings at once on 2 cores slow each other far more than 2x, so every training module is in
#: "torch"; the modules that generate or serve (their workers run torch on one thread) are in
#: "serve", which runs beside it. One group of both was the suite's critical path: ~13 of its
#: ~14 minutes, while the other worker idled for a third of them. Every other module stays whole
#: on one worker, in order.
TRAIN_MODULES = frozenset(
    {
        "test_cookbook_ft",
        "test_dashboard_training",
        "test_demo",
        "test_fine_tuning",
        "test_hub_push",
        "test_logprob",
        "test_models",
        "test_weighted_sft",
    }
)
SERVE_MODULES = frozenset(
    {
        "test_batches",
        "test_dashboard_deploy",
        "test_deploy",
        "test_gpu_serving",
        "test_inference",
        "test_inspect",
        "test_openai_api",
        "test_openai_inference",
    }
)
TORCH_MODULES = TRAIN_MODULES | SERVE_MODULES


def _group(module: str) -> str:
    if module in TRAIN_MODULES:
        return "torch"
    return "serve" if module in SERVE_MODULES else module


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_when_serving(request):
    """The "serve" group runs beside trainings: its workers (and so their jobs) and model
    servers use one torch thread, which generation on a tiny model hardly misses."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    if module not in SERVE_MODULES or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        item.add_marker(pytest.mark.xdist_group(_group(module)))


def wait_until(cond, timeout_s: float = 30.0, what: str = "condition", interval_s: float = 0.02):
    """Poll a condition with a deadline (tests only: the product itself never polls like this)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


base_env = clean_env


class Server(ServerProcess):
    """The test suite's server process (see `openweights.testing.server`)."""


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresCluster]:
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3() -> Iterator[MotoS3]:
    with MotoS3() as m:
        yield m


def _server_env(request, backend: str, home: Path) -> dict[str, str]:
    env = base_env(home)
    env["OPENWEIGHTS_LEASE_S"] = str(LEASE_S)
    if backend == "postgres":
        pg = request.getfixturevalue("pg")
        s3 = request.getfixturevalue("s3")
        env["OPENWEIGHTS_DATABASE_URL"] = pg.create_database()
        env["OPENWEIGHTS_STORAGE_URL"] = s3.storage_url + f"/{home.name}"
        env.update(s3.env())
    return env


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module", params=BACKENDS)
def server(request, tmp_path_factory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp(f"server-{request.param}")
    srv = Server(
        home=home, env=_server_env(request, request.param, home), backend=request.param
    ).start()
    yield srv
    srv.stop()


@pytest.fixture
def server_factory(request, tmp_path_factory):
    """Fresh servers for tests that kill or restart them."""
    made: list[Server] = []

    def make(backend: str = "sqlite", **env) -> Server:
        home = tmp_path_factory.mktemp(f"server-{backend}")
        e = _server_env(request, backend, home)
        e.update({k: str(v) for k, v in env.items()})
        srv = Server(home=home, env=e, backend=backend).start()
        made.append(srv)
        return srv

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def api_key(server) -> str:
    return server.signup()


@pytest.fixture
def ow(server, api_key):
    from openweights import OpenWeights

    client = OpenWeights(base_url=server.url, api_key=api_key)
    yield client
    client.close() if hasattr(client, "close") else None


@dataclass
class Worker:
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_worker(tmp_path) -> Iterator:
    """Start real worker processes (`python -m openweights.worker`); all are stopped at teardown."""
    procs: list[Worker] = []

    def start(
        url: str, token: str, *args: str, name: str | None = None, env: dict | None = None
    ) -> Worker:
        i = len(procs)
        log = tmp_path / f"worker-{i}.log"
        e = base_env(tmp_path / f"worker-home-{i}")
        e.update(env or {})
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openweights.worker",
                "--url",
                url,
                "--token",
                token,
                "--name",
                name or f"test-{i}",
                *args,
            ],
            env=e,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
        w = Worker(proc, log)
        procs.append(w)
        return w

    yield start
    for w in procs:
        if w.proc.poll() is None:
            try:
                os.killpg(w.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            w.proc.wait()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    """A migrated store database, in-process, on each back end."""
    from openweights.store.db import Database

    url = f"sqlite:///{tmp_path / 'x.db'}"
    if request.param == "postgres":
        url = (
            request.getfixturevalue("pg")
            .create_database()
            .replace("postgresql://", "postgresql+psycopg://")
        )
    d = Database(url)
    d.migrate()
    yield d
    d.dispose()
