"""The test suite's own back ends start, work and leave nothing behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest

from tests._infra import (
    MotoS3,
    PostgresCluster,
    PostgresNotFoundError,
    find_postgres_bindir,
    free_port,
    process_alive,
)

pytestmark = pytest.mark.postgres


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_missing_postgres_binaries_raise_a_clear_error(tmp_path):
    with pytest.raises(PostgresNotFoundError, match="apt-get install -y postgresql"):
        find_postgres_bindir(path=str(tmp_path), globs=[str(tmp_path / "nothing-*")])


def test_postgres_binaries_are_found():
    bindir = find_postgres_bindir()
    assert (bindir / "initdb").exists() and (bindir / "pg_ctl").exists()


def test_postgres_cluster_serves_databases_and_leaves_nothing_behind():
    with PostgresCluster() as pg:
        root, pid, port = pg.root, pg.pid, pg.port
        assert root is not None and pid is not None
        assert pg.url == f"postgresql://postgres@127.0.0.1:{port}/openweights"
        with psycopg.connect(pg.url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            assert int(version.split(".")[0]) >= 15
            assert conn.execute("SHOW fsync").fetchone()[0] == "off"
            assert conn.execute("SELECT current_database()").fetchone()[0] == "openweights"

        url = pg.create_database("isolated")
        assert url.endswith(f":{port}/isolated")
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (1), (2)")
            assert conn.execute("SELECT sum(x) FROM t").fetchone()[0] == 3
        other = pg.create_database()
        with psycopg.connect(other) as conn:
            tables = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 't'").fetchone()
            assert tables[0] == 0
        clone = pg.create_database("clone", template="isolated")
        with psycopg.connect(clone) as conn:
            assert conn.execute("SELECT sum(x) FROM t").fetchone()[0] == 3
        pg.drop_database("isolated")
        with pytest.raises(ValueError):
            pg.create_database('x"; DROP DATABASE postgres; --')
        assert process_alive(pid)
        assert _processes_mentioning(str(root))

    assert pg.root is None
    assert not root.exists()
    assert not process_alive(pid)
    assert _processes_mentioning(str(root)) == []
    assert not _port_open(port)
    pg.stop()  # a second stop is harmless


def test_moto_s3_stores_objects_and_stops():
    with MotoS3() as s3:
        process, port = s3.process, s3.port
        assert process is not None
        assert httpx.get(f"{s3.endpoint_url}/moto-api/").status_code == 200
        client = s3.client()
        client.put_object(Bucket=s3.bucket, Key="a/b.txt", Body=b"hello")
        assert client.get_object(Bucket=s3.bucket, Key="a/b.txt")["Body"].read() == b"hello"

        s3.reset()
        listing = client.list_objects_v2(Bucket=s3.bucket)
        assert listing["KeyCount"] == 0  # the bucket is back, empty

        env = s3.env()
        assert env["AWS_ENDPOINT_URL_S3"] == env["AWS_ENDPOINT_URL"] == s3.endpoint_url
        assert s3.storage_url == f"s3://{s3.bucket}"
        assert not any(k.startswith("OPENWEIGHTS_") for k in env)

    assert process.poll() is not None
    assert not _port_open(port)


def test_moto_env_is_enough_for_another_process():
    script = (
        "import boto3, json, sys\n"
        "c = boto3.client('s3')\n"
        "b = sys.argv[1]\n"
        "c.put_object(Bucket=b, Key='k', Body=b'from child')\n"
        "print(json.dumps(c.get_object(Bucket=b, Key='k')['Body'].read().decode()))\n"
    )
    with MotoS3(bucket="env-test") as s3:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        out = subprocess.run(
            [sys.executable, "-c", script, s3.bucket],
            env={**clean, **s3.env()},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert json.loads(out) == "from child"
        assert s3.client().get_object(Bucket="env-test", Key="k")["Body"].read() == b"from child"
