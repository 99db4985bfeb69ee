"""The fine-tuning cookbook (cookbook/sft, cookbook/preference_learning) runs as written against
a real server and worker, on the tiny offline model (OW_COOKBOOK_MODEL swaps the model id)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from openweights.testing import make_tiny_model
from tests.test_e2e import worker_token

# Each example is a real training job on a shared 2-core machine: minutes, not seconds.
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.timeout(900)]

COOKBOOK = Path(__file__).resolve().parent.parent / "cookbook"


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    from tests.conftest import Server, _server_env

    home = tmp_path_factory.mktemp("server-cookbook")
    srv = Server(home=home, env=_server_env(request, "sqlite", home)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def run_example(server, ow, api_key, start_worker, tiny_model, tmp_path):
    start_worker(server.url, worker_token(ow), "--any-hardware", env={"OMP_NUM_THREADS": "2"})

    def run(folder: str, script: str) -> tuple[str, Path]:
        work = tmp_path / folder
        shutil.copytree(COOKBOOK / folder, work, ignore=shutil.ignore_patterns("outputs"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENWEIGHTS_")}
        env.update(
            OPENWEIGHTS_URL=server.url,
            OPENWEIGHTS_API_KEY=api_key,
            OW_COOKBOOK_MODEL=str(tiny_model),
            MPLBACKEND="Agg",
            OW_COOKBOOK_EPOCHS="2",
            OMP_NUM_THREADS="1",
        )
        proc = subprocess.run(
            [sys.executable, script], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # examples that only submit: their jobs must finish too
        for job in ow.jobs.list():
            done = job.wait(timeout=600)
            assert done.status == "completed", (script, done.error)
        return proc.stdout, work

    return run


@pytest.mark.parametrize(
    "script",
    ["lora_qwen3_4b.py", "qlora_llama3_70b.py"],
)
def test_sft_submit_examples(run_example, ow, script):
    out, _ = run_example("sft", script)
    (job,) = ow.jobs.list()
    assert (
        f"The model will be pushed to: {job.params['validated_params']['finetuned_model_id']}"
        in out
    )


def test_logprob_tracking_plots_logps_per_tag(run_example):
    _, work = run_example("sft", "logprob_tracking.py")
    plots = {p.name for p in (work / "outputs" / "logp_tracking").glob("*.png")}
    assert {"logp.png", "loss.png"} <= plots
    assert list((work / "outputs" / "logp_tracking").rglob("step-4.jsonl"))


def test_token_level_weighted_sft(run_example, ow):
    _, work = run_example("sft", "token_level_weighted_sft.py")
    assert (work / "outputs" / "weighted_sft" / "logp.png").exists()
    (job,) = ow.jobs.list()
    assert job.id.startswith("sftjob-")


def test_sampling_callback_plots_the_fraction_of_samples(run_example):
    _, work = run_example("sft", "sampling_callback.py")
    assert (work / "outputs" / "sampling" / "sampling_eval.png").exists()
    assert list((work / "outputs" / "sampling").rglob("samples/samples/step-*.jsonl"))


@pytest.mark.parametrize("script", ["llama3_dpo.py", "llama3_orpo.py"])
def test_preference_learning_examples(run_example, ow, script):
    run_example("preference_learning", script)
    (job,) = ow.jobs.list()
    assert job.params["validated_params"]["loss"] == script.split("_")[1].removesuffix(".py")
