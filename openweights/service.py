"""The embedded service: a local server + a local worker pool in one background process.

`OpenWeights()` with no `OPENWEIGHTS_URL` calls `ensure_running`, which attaches to the service
recorded in `$OPENWEIGHTS_HOME/service.json` or starts one (detached, so jobs outlive the script
that submitted them). Its database, blobs and credentials live in `$OPENWEIGHTS_HOME`.
`ow service status|start|stop|restart` manage it.

This module is imported by the client: keep its top-level imports light.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from openweights._exceptions import ServiceError
from openweights._settings import Settings

__all__ = ["Credentials", "ensure_running", "restart", "status", "stop"]

START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Credentials:
    url: str
    api_key: str
    org_id: str


def _paths(home: Path) -> dict[str, Path]:
    return {
        "service": home / "service.json",
        "credentials": home / "credentials.json",
        "worker_token": home / "worker.token",
        "lock": home / "service.lock",
        "log": home / "logs" / "service.log",
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _healthy(url: str, timeout_s: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_private(path: Path, data: str) -> None:
    """Write a file only its owner can read (credentials), atomically."""
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _running(home: Path) -> dict | None:
    info = _read_json(_paths(home)["service"])
    if info and _alive(int(info.get("pid", 0))) and _healthy(info["url"]):
        return info
    return None


def _credentials(home: Path, url: str) -> Credentials:
    creds = _read_json(_paths(home)["credentials"])
    if not creds:
        raise ServiceError(
            f"The embedded service in {home} has no credentials file; restart it: `ow service restart`."
        )
    return Credentials(url=url, api_key=creds["api_key"], org_id=creds["org_id"])


def ensure_running(settings: Settings | None = None) -> Credentials:
    """Attach to the embedded service, starting it in the background if it is not running."""
    settings = settings or Settings()
    home = settings.home
    info = _running(home)
    if info:
        return _credentials(home, info["url"])
    import fcntl

    home.mkdir(parents=True, exist_ok=True)
    p = _paths(home)
    with open(p["lock"], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second script waits here, then attaches
        info = _running(home)
        if info:
            return _credentials(home, info["url"])
        p["service"].unlink(missing_ok=True)
        p["log"].parent.mkdir(parents=True, exist_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("OPENWEIGHTS_URL", "OPENWEIGHTS_API_KEY")
        }
        env["OPENWEIGHTS_HOME"] = str(home)
        with open(p["log"], "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "openweights.service", "run"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives the script that started it
                close_fds=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            info = _read_json(p["service"])
            if info and info.get("pid") == proc.pid and _healthy(info["url"]):
                return _credentials(home, info["url"])
            if proc.poll() is not None:
                tail = p["log"].read_text(errors="replace")[-2000:]
                raise ServiceError(f"The embedded openweights service exited at start:\n{tail}")
            time.sleep(0.05)
        raise ServiceError(
            f"The embedded openweights service did not start within {START_TIMEOUT_S:.0f} s; see {p['log']}."
        )


def status(settings: Settings | None = None) -> dict:
    settings = settings or Settings()
    home = settings.home
    info = _read_json(_paths(home)["service"]) or {}
    running = bool(info) and _alive(int(info.get("pid", 0))) and _healthy(info.get("url", ""))
    out = {
        "home": str(home),
        "running": running,
        "url": info.get("url") if running else None,
        "dashboard": f"{info.get('url')}/dashboard/" if running else None,
        "pid": info.get("pid") if running else None,
        "log": str(_paths(home)["log"]),
    }
    if running:
        out["workers"] = info.get("workers", 0)
        out["started_at"] = info.get("started_at")
    return out


def stop(settings: Settings | None = None, timeout_s: float = 30.0) -> bool:
    """Stop the embedded service (its workers give running jobs back to the queue)."""
    settings = settings or Settings()
    p = _paths(settings.home)
    info = _read_json(p["service"])
    if not info or not _alive(int(info.get("pid", 0))):
        p["service"].unlink(missing_ok=True)
        return False
    pid = int(info["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
        try:  # reap if it is our child (tests)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    p["service"].unlink(missing_ok=True)
    return True


def restart(settings: Settings | None = None) -> Credentials:
    settings = settings or Settings()
    stop(settings)
    return ensure_running(settings)


# -- the service process ---------------------------------------------------------------------


def _bootstrap(settings: Settings) -> tuple[str, str]:
    """First start: make the local org, its admin key and a worker key. Returns (user, worker) keys."""
    from openweights.store import orgs
    from openweights.store.db import Database

    p = _paths(settings.home)
    db = Database(settings.resolved_database_url())
    db.migrate()
    creds = _read_json(p["credentials"])
    worker_token = p["worker_token"].read_text().strip() if p["worker_token"].exists() else None
    with db.write() as conn:
        now = db.now(conn)
        if creds is None:
            org = orgs.create_org(conn, "local", now)
            _, key = orgs.create_token(
                conn, org_id=org["id"], name="local admin", kind="user", now=now
            )
            creds = {"api_key": key, "org_id": org["id"]}
            _write_private(p["credentials"], json.dumps(creds, indent=2))
        if worker_token is None:
            _, worker_token = orgs.create_token(
                conn, org_id=creds["org_id"], name="local worker pool", kind="worker", now=now
            )
            _write_private(p["worker_token"], worker_token)
    db.dispose()
    return creds["api_key"], worker_token


def _pool_size() -> int:
    try:
        from openweights.worker.hardware import probe

        hw = probe()
        return max(1, hw.gpu_count)
    except Exception:
        return 1


class _WorkerPool:
    """Local worker processes, restarted if they die, stopped (gracefully) with the service.

    They are pods of the cluster's `local` provider (`openweights.cluster.providers.local`),
    named `ow-local-<i>`, with records and logs under `$OPENWEIGHTS_HOME/pool/`."""

    def __init__(self, url: str, token: str, size: int, home: Path) -> None:
        from openweights.cluster.providers.local import LocalProvider
        from openweights.types import Hardware

        self.url, self.token, self.size, self.home = url, token, size, home
        self.procs: list[subprocess.Popen | None] = [None] * size
        self._stop = threading.Event()
        base = {k: v for k, v in os.environ.items() if k not in ("OPENWEIGHTS_API_KEY",)}
        # each worker takes every job (--any-hardware): the probe's shape only names the offer
        self.provider = LocalProvider(
            home / "pool", hardware=Hardware(), max_pods=size, base_env=base, own_session=False
        )

    def _spawn(self, i: int) -> subprocess.Popen:
        from openweights.cluster.providers.base import PodSpec
        from openweights.cluster.providers.local import local_offer

        env = {
            "OPENWEIGHTS_URL": self.url,
            "OPENWEIGHTS_API_KEY": self.token,
            "OW_ANY_HARDWARE": "1",
        }
        if self.size > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i)
        name = f"ow-local-{i}"
        self.provider.terminate(name)  # one left by a service that was killed: it is stale
        offer = local_offer(self.provider.hardware)
        self.provider.launch(PodSpec(name=name, image="", offer=offer, env=env))
        proc = self.provider.process(name)
        assert proc is not None
        return proc

    def run(self) -> None:
        """One supervising thread per slot, each blocked on its process until it exits."""
        import threading

        for i in range(self.size):
            threading.Thread(
                target=self._supervise, args=(i,), daemon=True, name=f"pool-{i}"
            ).start()

    def _supervise(self, i: int) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            started = time.monotonic()
            proc = self.procs[i] = self._spawn(i)
            if self._stop.is_set():  # stop() ran while it was starting
                proc.terminate()
            proc.wait()
            if time.monotonic() - started > 60:
                backoff = 0.0  # it ran fine for a while: restart at once
            else:
                backoff = min(max(backoff * 2, 1.0), 30.0)  # crashing at start: don't spin
            self._stop.wait(backoff)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self, timeout_s: float = 20.0) -> None:
        self._stop.set()
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        for i in range(self.size):
            self.provider.terminate(f"ow-local-{i}")  # exited by now: drops its record


def run_service(settings: Settings | None = None) -> None:
    """The service process itself: server on a free loopback port + the local worker pool."""
    import socket
    import threading

    import uvicorn

    from openweights.server.app import create_app

    settings = settings or Settings()
    home = settings.home
    p = _paths(home)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    _key, worker_token = _bootstrap(settings)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    config = uvicorn.Config(
        create_app(settings), log_level="warning", access_log=False, timeout_graceful_shutdown=3
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # we handle signals below
    pool = _WorkerPool(url, worker_token, _pool_size(), home)

    def shut_down() -> None:
        pool.stop()  # workers give running jobs back while the server still answers
        server.should_exit = True

    def on_signal(_sig, _frame) -> None:
        if not pool.stopping:
            threading.Thread(target=shut_down, daemon=True).start()
        else:
            server.should_exit = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.should_exit:
            return
        threading.Thread(target=pool.run, daemon=True, name="worker-pool").start()
        info = {"pid": os.getpid(), "url": url, "started_at": time.time(), "workers": pool.size}
        tmp = p["service"].with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, p["service"])
        print(f"openweights service: {url} (home {home}, {pool.size} local worker(s))", flush=True)
        print(f"openweights dashboard: {url}/dashboard/", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        pool.stop()
        info = _read_json(p["service"])
        if info and info.get("pid") == os.getpid():
            p["service"].unlink(missing_ok=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["run"]:
        run_service()
    else:
        print(
            "usage: python -m openweights.service run   (use `ow service start|stop|status`)",
            file=sys.stderr,
        )
        sys.exit(2)
