"""Fuzz the OpenAPI schema against the real server (schemathesis): no 5xx, no stack traces."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_schemathesis_finds_no_server_errors(server_factory):
    srv = server_factory("sqlite")
    key = srv.signup("fuzz")
    exe = shutil.which("schemathesis") or shutil.which("st")
    cmd = [exe] if exe else [sys.executable, "-m", "schemathesis.cli"]
    proc = subprocess.run(
        [
            *cmd,
            "run",
            f"{srv.url}/openapi.json",
            "-H",
            f"Authorization: Bearer {key}",
            # every check but positive_data_acceptance: POST /v1/files takes `purpose` from the
            # query or a multipart form, and /v1/events needs job_id or run_id, which OpenAPI
            # cannot express as "one of"
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "10",
            "--phases",
            "coverage,fuzzing",
            # long-polls wait by design; dedicated tests cover them
            "--exclude-path-regex",
            r"(/wait$|/heartbeat$|/claim$)",
            "--seed",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    log = (srv.home / "server.log").read_text()
    assert "Traceback" not in log, log[-4000:]
