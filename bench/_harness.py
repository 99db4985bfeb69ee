"""Shared pieces of the benchmarks: a real server process per backend, percentiles, process stats.

The server is started exactly as the test suite starts it (`python -m openweights.server --port P`
with `OPENWEIGHTS_HOME=<tmp>`); the PostgreSQL backend uses the test suite's throwaway
`PostgresCluster` and `MotoS3` (tests/_infra.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from openweights.testing.server import ServerProcess, clean_env  # noqa: E402
from tests._infra import MotoS3, PostgresCluster  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- statistics ------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def summary_ms(seconds: list[float]) -> dict:
    """p50 / p90 / p99 / mean / min / max in milliseconds."""
    ms = [x * 1000 for x in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3),
        "p90_ms": round(pct(ms, 90), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "min_ms": round(min(ms), 3),
        "max_ms": round(max(ms), 3),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)


# -- processes -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int | str, key: str) -> int | None:
    """A `/proc/<pid>/status` field in kB (VmHWM = peak RSS, VmRSS = current RSS)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def machine() -> dict:
    info = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import uvloop  # noqa: F401

        info["uvloop"] = True
    except ImportError:
        info["uvloop"] = False
    return info


# -- the server ------------------------------------------------------------------------------


base_env = clean_env


class Server(ServerProcess):
    """The benchmark's server process (see `openweights.testing.server`)."""

    def signup(self, name: str = "bench") -> str:
        return super().signup(name)


@dataclass
class Backend:
    """What a backend gives a benchmark: a way to start servers and to make fresh databases."""

    name: str
    workdir: Path
    pg: PostgresCluster | None = None
    s3: MotoS3 | None = None
    #: settings for every server this backend starts (e.g. OPENWEIGHTS_PG_CLAIM_FUNCTION)
    extra_env: dict[str, str] = field(default_factory=dict)

    def server_env(self, home: Path) -> dict[str, str]:
        env = base_env(home)
        if self.name == "postgres":
            assert self.pg is not None and self.s3 is not None
            env["OPENWEIGHTS_DATABASE_URL"] = self.pg.create_database()
            env.update(self.s3.env())
            env["OPENWEIGHTS_STORAGE_URL"] = self.s3.storage_url + f"/{home.name}"
        env.update(self.extra_env)
        return env

    def start_server(self, label: str = "server") -> Server:
        home = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self.workdir))
        return Server(home=home, env=self.server_env(home)).start()

    def fresh_database_url(self) -> str:
        """A SQLAlchemy URL of an empty database of this backend (for in-process floors)."""
        if self.name == "postgres":
            assert self.pg is not None
            return self.pg.create_database().replace("postgresql://", "postgresql+psycopg://", 1)
        d = Path(tempfile.mkdtemp(prefix="rawdb-", dir=self.workdir))
        return f"sqlite:///{d / 'openweights.db'}"


@contextlib.contextmanager
def backend(name: str) -> Iterator[Backend]:
    workdir = Path(tempfile.mkdtemp(prefix=f"ow-bench-{name}-"))
    try:
        if name == "postgres":
            with PostgresCluster() as pg, MotoS3() as s3:
                yield Backend(name, workdir, pg, s3)
        elif name == "sqlite":
            yield Backend(name, workdir)
        else:
            raise ValueError(f"unknown backend {name!r}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
