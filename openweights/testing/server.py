"""A real openweights server in a child process, for tests and benchmarks (yours too)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home: Path) -> dict[str, str]:
    """This environment without OPENWEIGHTS_* settings, with its own home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENWEIGHTS_")}
    env.update(OPENWEIGHTS_HOME=str(home), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


@dataclass
class ServerProcess:
    """`python -m openweights.server` on a free loopback port, logging to `home/server.log`."""

    home: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    backend: str = "sqlite"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 60) -> ServerProcess:
        import httpx

        log = open(self.home / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "openweights.server", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=1, trust_env=False) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError("server exited:\n" + self.log_tail())
                try:
                    if http.get(f"{self.url}/health").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)  # waiting for a child process to bind: nothing to be woken by
        self.stop()
        raise RuntimeError("server did not answer /health in time:\n" + self.log_tail())

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (self.home / "server.log").read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def signup(self, name: str = "lab") -> str:
        """A new org on this server; returns its admin API key."""
        import httpx

        r = httpx.post(f"{self.url}/v1/signup", json={"org_name": name}, trust_env=False)
        r.raise_for_status()
        return r.json()["token"]["token"]
