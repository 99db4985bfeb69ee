"""`ow.inspect_ai`: a real `inspect eval` of the tiny model, served by `transformers serve` inside a
job on a real worker, with the task file shipped with the tests (no network)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from openweights.testing import make_tiny_model
from tests.test_e2e import worker_token

pytestmark = pytest.mark.filterwarnings("ignore")
pytest.importorskip("inspect_ai", reason="inspect-ai is in the test extra")

TASK = Path(__file__).parent / "data" / "inspect_task.py"
COOKBOOK = Path(__file__).resolve().parent.parent / "cookbook"


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    from tests.conftest import Server, _server_env

    home = tmp_path_factory.mktemp("server-inspect")
    srv = Server(home=home, env=_server_env(request, "sqlite", home)).start()
    yield srv
    srv.stop()


def test_cookbook_inspect_eval_with_a_mounted_task_file_stores_its_logs(
    server, ow, api_key, start_worker, tmp_path
):
    """cookbook/inspect_eval.py as written, on the tiny model and the suite's task file."""
    tiny = str(make_tiny_model(tmp_path / "tiny"))
    start_worker(server.url, worker_token(ow), "--any-hardware")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENWEIGHTS_")}
    env.update(
        OPENWEIGHTS_URL=server.url,
        OPENWEIGHTS_API_KEY=api_key,
        OW_COOKBOOK_MODEL=tiny,
        OW_COOKBOOK_EVAL=f"{TASK}@tiny_echo",
        OW_COOKBOOK_OPTIONS="--max-tokens 4 --temperature 0",
        OMP_NUM_THREADS="1",
    )
    work = tmp_path / "cookbook"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, str(COOKBOOK / "inspect_eval.py")],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (job,) = ow.inspect_ai.list()
    log = ow.files.content(job.runs[-1].log_file).decode()
    assert proc.returncode == 0 and job.status == "completed", proc.stderr[-2000:] + log[-3000:]
    assert job.type == "inspect_ai" and job.id.startswith("inspectai-")
    assert job.params["validated_params"]["eval_name"] == "tasks/inspect_task.py@tiny_echo"
    assert "tasks/inspect_task.py" in job.params["mounted_files"]
    (result,) = job.outputs["results"]
    assert result["task"] == "tiny_echo" and result["status"] == "success"
    assert result["samples"] == 2 and "includes/accuracy" in result["metrics"]
    assert result["model"] == "openai-api/ow/tiny"
    assert "tiny_echo" in proc.stdout  # the script printed the results
    evals = list((work / "output").rglob("*.eval"))
    assert len(evals) == 1

    from inspect_ai.log import read_eval_log

    full = read_eval_log(str(evals[0]))
    assert len(full.samples) == 2 and all(s.output.completion is not None for s in full.samples)


def test_unknown_task_fails_before_loading_the_model(server, ow, start_worker, tmp_path):
    tiny = str(make_tiny_model(tmp_path / "tiny"))
    start_worker(server.url, worker_token(ow), "--any-hardware")
    job = ow.inspect_ai.create(model=tiny, eval_name="no_such_registry/task")
    job.wait(timeout_s=300)
    assert job.status == "failed"
    log = ow.files.content(job.runs[-1].log_file).decode()
    assert "no_such_registry/task" in log and "no package 'no_such_registry'" in log
