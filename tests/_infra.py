"""Real back ends for the test suite: a throwaway PostgreSQL cluster and a moto S3 server.

    with PostgresCluster() as pg, MotoS3() as s3:
        url = pg.create_database("test_files")   # postgresql://postgres@127.0.0.1:PORT/test_files
        env = {**os.environ, **s3.env(), "OPENWEIGHTS_STORAGE_URL": s3.storage_url + "/t1"}

Both are started as subprocesses on free ports and are gone (processes and files) after exit.
They are also stopped at interpreter exit if a test run dies before `__exit__`.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

__all__ = [
    "MotoS3",
    "PostgresCluster",
    "PostgresNotFoundError",
    "free_port",
    "find_postgres_bindir",
    "process_alive",
]

POLL_INTERVAL_S = 0.05
PG_START_TIMEOUT_S = 60
MOTO_START_TIMEOUT_S = 30
PG_BIN_GLOBS = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/opt/homebrew/opt/postgresql@*/bin",
)
_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (macOS): kill(0) said it exists


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# PostgreSQL


class PostgresNotFoundError(RuntimeError):
    """No PostgreSQL server binaries (initdb, pg_ctl) were found."""


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def find_postgres_bindir(*, path: str | None = None, globs: Iterable[str] = PG_BIN_GLOBS) -> Path:
    """The directory holding `initdb` and `pg_ctl`: from PATH, else the newest under `globs`."""
    initdb = shutil.which("initdb", path=path)
    if initdb:
        bindir = Path(os.path.realpath(initdb)).parent
        if (bindir / "pg_ctl").exists():
            return bindir
    candidates = [d for pattern in globs for d in glob.glob(pattern) if Path(d, "initdb").exists()]
    if candidates:
        return Path(max(candidates, key=_version_key))
    raise PostgresNotFoundError(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH nor under "
        f"{', '.join(globs)}. Install them: `apt-get install -y postgresql` "
        "(.ci/run does this), or put their directory on PATH."
    )


class PostgresCluster:
    """A throwaway PostgreSQL cluster in a temporary directory, on a free port.

    `url` points at the database `dbname` created at start; `create_database()` makes more for
    tests that need isolation. Durability is off (fsync, full pages, synchronous commit): the
    cluster lives only as long as the test run. As root, the server runs as the `postgres` user
    (initdb refuses root).
    """

    def __init__(
        self,
        *,
        dbname: str = "openweights",
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        bindir: str | Path | None = None,
    ) -> None:
        self.dbname = dbname
        self.port = port or 0
        self.settings = {
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            **(settings or {}),
        }
        self._bindir = Path(bindir) if bindir else None
        self.root: Path | None = None  # temp dir holding data/, sock/, server.log
        self.pid: int | None = None  # the postmaster
        self._as_postgres: list[str] = []

    # paths
    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "cluster not started"
        return self.root / "server.log"

    @property
    def url(self) -> str:
        """`postgresql://postgres@127.0.0.1:PORT/DBNAME`."""
        return self.url_for(self.dbname)

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    # lifecycle
    def start(self) -> PostgresCluster:
        if self.root is not None:
            raise RuntimeError("PostgresCluster already started")
        bindir = self._bindir or find_postgres_bindir()
        self._initdb_bin, self._pg_ctl_bin = str(bindir / "initdb"), str(bindir / "pg_ctl")
        self.root = Path(tempfile.mkdtemp(prefix="ow-pg-"))
        atexit.register(self.stop)
        try:
            self._prepare_root()
            flags = "--auth=trust -U postgres -E UTF8 --no-locale --no-sync".split()
            self._run([self._initdb_bin, "-D", str(self.data_dir), *flags], what="initdb")
            self._start_server()
            self.create_database(self.dbname)
        except BaseException:
            self.stop()
            raise
        return self

    def _prepare_root(self) -> None:
        assert self.root is not None
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root, but there is no `postgres` user to run PostgreSQL as "
                    "(initdb refuses root); `apt-get install -y postgresql` creates it"
                ) from None
            for p in (self.root, self.socket_dir):
                os.chown(p, user.pw_uid, user.pw_gid)
            self._as_postgres = ["runuser", "-u", "postgres", "--"]

    def _run(self, argv: list[str], *, what: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            self._as_postgres + argv,
            cwd=self.root,  # postgres can't enter root's cwd; spares "could not change directory"
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def _start_server(self) -> None:
        fixed_port = bool(self.port)
        for attempt in range(3):
            if not fixed_port:
                self.port = free_port()
            options = [f"-p {self.port}", f"-k {self.socket_dir}", "-c listen_addresses=127.0.0.1"]
            options += [f"-c {k}={v}" for k, v in self.settings.items()]
            try:
                self._run(
                    [
                        self._pg_ctl_bin,
                        "-D",
                        str(self.data_dir),
                        "-l",
                        str(self.log_path),
                        "-o",
                        " ".join(options),
                        "-w",
                        "-t",
                        str(PG_START_TIMEOUT_S),
                        "start",
                    ],
                    what="pg_ctl start",
                    timeout=PG_START_TIMEOUT_S + 10,
                )
            except RuntimeError as e:
                log = _tail(self.log_path)
                # Another process took the port between free_port() and bind: try another.
                if not fixed_port and attempt < 2 and "already in use" in log:
                    continue
                raise RuntimeError(f"{e}\nserver log:\n{log}") from None
            break
        self.pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """Stop the server (immediate shutdown) and delete its directory. Safe to call twice."""
        atexit.unregister(self.stop)
        root, self.root = self.root, None
        if root is None:
            return
        data_dir = root / "data"
        try:
            if self.pid is not None or (data_dir / "postmaster.pid").exists():
                subprocess.run(
                    self._as_postgres
                    + [self._pg_ctl_bin, "-D", str(data_dir), "-m", "immediate", "-w", "stop"],
                    cwd=root,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=60,
                )
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            if self.pid is not None:
                _kill_and_wait(self.pid)
            self.pid = None
            shutil.rmtree(root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # databases
    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.url_for("postgres"), autocommit=True, connect_timeout=10)

    def create_database(self, name: str | None = None, *, template: str | None = None) -> str:
        """Create a database and return its URL.

        `name` None: a fresh unique name. `template`: a copy of that database (which must have
        no open connections), e.g. one migrated once per session, cloned per test.
        """
        name = name or f"db_{uuid.uuid4().hex[:12]}"
        for n in (name, template):
            if n is not None and not _DB_NAME.match(n):
                raise ValueError(f"database name {n!r} must match {_DB_NAME.pattern}")
        sql = f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")
        with self._admin() as conn:
            conn.execute(sql)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting its clients."""
        if not _DB_NAME.match(name):
            raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _kill_and_wait(pid: int, timeout_s: float = 10) -> None:
    """SIGKILL a daemon we started (not our child) and wait until it is gone."""
    if not process_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)


# ---------------------------------------------------------------------------------------------
# S3


class MotoS3:
    """A moto S3 server (`python -m moto.server`) on a free port, with one bucket created.

    Everything is in the server's memory; `reset()` wipes it and re-creates the bucket.
    """

    access_key = "test"
    secret_key = "test"

    def __init__(
        self,
        *,
        bucket: str = "openweights-test",
        region: str = "us-east-1",
        port: int | None = None,
    ) -> None:
        self.bucket = bucket
        self.region = region
        self.port = port or 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log_dir: Path | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_url(self) -> str:
        """`s3://BUCKET`, the form `OPENWEIGHTS_STORAGE_URL` takes."""
        return f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """AWS_* environment for a process (e.g. an openweights server) to use this S3.

        Not `OPENWEIGHTS_STORAGE_URL`: callers choose the prefix (`storage_url + "/test-x"`).
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            # No instance-metadata lookups (seconds of timeouts off EC2).
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}),
        )

    def start(self) -> MotoS3:
        if self.process is not None:
            raise RuntimeError("MotoS3 already started")
        self._log_dir = Path(tempfile.mkdtemp(prefix="ow-moto-"))
        atexit.register(self.stop)
        try:
            self._start_server()
            self._create_bucket()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_server(self) -> None:
        assert self._log_dir is not None
        fixed_port = bool(self.port)
        log_path = self._log_dir / "moto.log"
        for attempt in range(3):
            if not fixed_port:
                self.port = free_port()
            # A file, not a pipe: moto logs every request and would block on a full pipe.
            with open(log_path, "wb") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "MOTO_PORT": str(self.port)},
                )
            if self._wait_ready(self.process):
                return
            self.process.wait()
            self.process = None
            log = _tail(log_path)
            if not fixed_port and attempt < 2 and "already in use" in log:
                continue
            raise RuntimeError(f"moto server exited before it was ready; its log:\n{log}")

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + MOTO_START_TIMEOUT_S
        with httpx.Client(timeout=2, trust_env=False) as http:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    return False
                try:
                    if http.get(f"{self.endpoint_url}/moto-api/").status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                time.sleep(POLL_INTERVAL_S)
        process.kill()
        raise RuntimeError(
            f"moto server did not answer on {self.endpoint_url} within {MOTO_START_TIMEOUT_S}s"
        )

    def _create_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        self.client().create_bucket(**kwargs)

    def reset(self) -> None:
        """Delete everything stored (all buckets and objects), then re-create the bucket."""
        response = httpx.post(f"{self.endpoint_url}/moto-api/reset", timeout=10, trust_env=False)
        response.raise_for_status()
        self._create_bucket()

    def stop(self) -> None:
        """Stop the server and delete its log. Safe to call twice."""
        atexit.unregister(self.stop)
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
