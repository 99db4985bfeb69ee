"""Deployments (`ow.api`): real `api` jobs on a real worker serving the tiny model and LoRA adapters
of it with `transformers serve`, reached through the server's `/v1`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from openweights.client.api import DeploymentError, group_by_base
from openweights.jobs.api import estimate_vram_gb
from openweights.testing import make_tiny_model
from tests.conftest import wait_until
from tests.test_e2e import alive, worker_token

pytestmark = pytest.mark.filterwarnings("ignore")

MSG = [{"role": "user", "content": "apple river"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    from tests.conftest import Server, _server_env

    home = tmp_path_factory.mktemp("server-deploy")
    srv = Server(home=home, env=_server_env(request, "sqlite", home)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


def make_adapter(base: str, out, seed: int) -> str:
    """A real LoRA adapter of `base` (random B so that it changes the outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def org(server):
    from openweights import OpenWeights

    client = OpenWeights(base_url=server.url, api_key=server.signup())
    yield client
    client.close()


def stop_worker(proc) -> None:
    """SIGTERM first: the worker stops its job (and so the model server) before it exits."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def worker(server, org, tmp_path_factory):
    from tests.conftest import base_env

    tmp = tmp_path_factory.mktemp("worker")
    proc = subprocess.Popen(
        [sys.executable, "-m", "openweights.worker", "--url", server.url]
        + ["--token", worker_token(org), "--name", "w", "--any-hardware"],
        env=base_env(tmp / "home"),
        stdout=open(tmp / "worker.log", "ab"),
        stderr=subprocess.STDOUT,
        cwd=tmp,
        start_new_session=True,
    )
    yield proc
    stop_worker(proc)


def test_vram_estimate_and_grouping_by_base(tiny, tmp_path):
    assert estimate_vram_gb("unsloth/Qwen3-4B") == 8 + 15
    assert estimate_vram_gb("meta-llama/Llama-3.3-70B-Instruct", quantization="bnb-4bit") == 35 + 15
    assert estimate_vram_gb("org/mystery") == 64 + 15
    assert estimate_vram_gb(tiny) == 16  # a local model: the bytes of its weights (rounded up)
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny}))
    assert group_by_base([str(adapter), "x/y", tiny]) == {
        tiny: [str(adapter), tiny],
        "x/y": ["x/y"],
    }


def test_front_listens_where_the_worker_is_reachable(monkeypatch):
    from openweights.jobs.serving import RUNPOD_PORT, public_endpoint

    for var in ("OW_DEPLOY_PUBLIC_URL", "OW_DEPLOY_PORT", "RUNPOD_POD_ID"):
        monkeypatch.delenv(var, raising=False)
    host, port, url = public_endpoint()
    assert host == "127.0.0.1" and url == f"http://127.0.0.1:{port}"  # a local worker: loopback
    monkeypatch.setenv("RUNPOD_POD_ID", "abc123")
    assert public_endpoint() == (
        "0.0.0.0",
        RUNPOD_PORT,
        f"https://abc123-{RUNPOD_PORT}.proxy.runpod.net",
    )
    monkeypatch.setenv("OW_DEPLOY_PUBLIC_URL", "http://10.0.0.5:9000/")
    monkeypatch.setenv("OW_DEPLOY_PORT", "9000")
    assert public_endpoint() == ("0.0.0.0", 9000, "http://10.0.0.5:9000")


def test_multi_deploy_serves_lora_adapters_on_one_server_up_and_down(org, worker, tiny, tmp_path):
    a1 = make_adapter(tiny, tmp_path / "a1", seed=1)
    a2 = make_adapter(tiny, tmp_path / "a2", seed=2)
    apis = org.api.multi_deploy([a1, a2])
    assert apis[a1] is apis[a2]  # one server for the base
    api = apis[a1]
    api.up()
    try:
        assert set(api.models) == {tiny, a1, a2} and api.engine == "transformers"
        answers = {}
        for m in (tiny, a1, a2):
            c = org.chat.completions.create(
                model=m, messages=MSG, max_tokens=8, temperature=0, deploy=False
            )
            assert c.model == m
            answers[m] = c.choices[0].message.content
        assert len(set(answers.values())) > 1, answers  # the adapters change what it says
        info = next(
            e["data"]
            for e in org.events.list(job_id=api.job_id)
            if e["data"].get("type") == "deployment"
        )
        job_id = api.job_id
    finally:
        api.down()
    # cancel stops the model server process and closes the port
    assert org.jobs.wait(job_id, timeout_s=60).status == "canceled"
    wait_until(lambda: not alive(info["server_pid"]), timeout_s=30, what="model server exit")
    with pytest.raises(httpx.TransportError):
        httpx.get(info["base_url"].removesuffix("/v1") + "/health", timeout=2)


def test_async_client_context_manager_and_streaming(server, org, worker, tiny):
    from openweights import AsyncOpenWeights

    async def main():
        async with AsyncOpenWeights(base_url=server.url, api_key=org.api_key) as aow:
            async with aow.api.deploy(tiny) as api:
                job_id = api.job_id
                c = await aow.chat.completions.create(
                    model=tiny, messages=MSG, max_tokens=3, deploy=False
                )
                assert c.model == tiny
                stream = await aow.chat.completions.create(
                    model=tiny, messages=MSG, max_tokens=3, stream=True, deploy=False
                )
                chunks = [ch async for ch in stream]
                assert chunks[-1].choices[0].finish_reason in ("length", "stop")
            return job_id

    job_id = asyncio.run(main())
    assert org.jobs.wait(job_id, timeout_s=60).status == "canceled"


def test_deployment_that_fails_to_start_raises_with_its_log_tail(org, worker, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "README.md").write_text("no weights here")

    async def enter():  # `async with` works on the sync client's deployments too
        async with org.api.deploy(str(broken)):
            raise AssertionError("it must not come up")

    with pytest.raises(DeploymentError, match="did not start") as e:
        asyncio.run(enter())
    assert "neither config.json" in str(e.value) and "log tail" in str(e.value)
    assert e.value.job.status == "failed"


COOKBOOK = Path(__file__).resolve().parent.parent / "cookbook" / "api-deployment"


def _cookbook_env(server, org, tiny) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENWEIGHTS_")}
    env.update(
        OPENWEIGHTS_URL=server.url,
        OPENWEIGHTS_API_KEY=org.api_key,
        OW_COOKBOOK_MODEL=tiny,
        OMP_NUM_THREADS="1",
    )
    return env


def test_cookbook_context_manager_api(server, org, worker, tiny, tmp_path):
    proc = subprocess.run(
        [sys.executable, "context_manager_api.py"],
        cwd=COOKBOOK, env=_cookbook_env(server, org, tiny),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "role='assistant'" in proc.stdout
    newest = org.jobs.list(type="api", limit=1)[0]  # the example's deployment, stopped on exit
    assert newest.params["validated_params"]["model"] == tiny and newest.status == "canceled"


def test_cookbook_gradio_ui_builds_its_chat_on_a_deployment(server, org, worker, tiny):
    pytest.importorskip("gradio", reason="gradio is optional (pip install gradio fire)")
    pytest.importorskip("fire", reason="fire is optional (pip install gradio fire)")
    launch_noop = (
        "import sys, runpy, gradio; gradio.Blocks.launch = lambda self, *a, **k: print('launched');"
        "sys.argv = ['gradio_ui.py', sys.argv[1]]; runpy.run_path('gradio_ui.py', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", launch_noop, tiny],
        cwd=COOKBOOK, env=_cookbook_env(server, org, tiny),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and "launched" in proc.stdout, proc.stderr[-3000:]


def test_sync_and_async_twins_match():
    import inspect

    from openweights.client.api import API, AsyncAPI, AsyncDeployments, Deployments
    from openweights.client.chat import AsyncChat, AsyncCompletions, Chat, Completions

    io = {"up", "down", "start", "wait_ready", "create", "close"}
    for sync_cls, async_cls in [
        (Deployments, AsyncDeployments),
        (API, AsyncAPI),
        (Chat, AsyncChat),
        (Completions, AsyncCompletions),
    ]:
        public = {n for n in dir(sync_cls) if not n.startswith("_")}
        assert public == {n for n in dir(async_cls) if not n.startswith("_")}, sync_cls
        for name in public:
            s, a = getattr(sync_cls, name), getattr(async_cls, name)
            if not inspect.isfunction(s):
                continue
            shape = [(p.name, p.kind, p.default) for p in inspect.signature(s).parameters.values()]
            twin = [(p.name, p.kind, p.default) for p in inspect.signature(a).parameters.values()]
            assert shape == twin, f"{sync_cls.__name__}.{name}"
            assert inspect.iscoroutinefunction(a) == (name in io), f"{async_cls.__name__}.{name}"


def test_streamed_answers_are_renamed_even_when_a_chunk_splits_the_model_name():
    import asyncio

    from openweights.jobs.serving import _renamed_events

    data = (
        b'data: {"id":"1","model":"/tmp/merged/adapter-0","x":1}\n\n'
        b'data: {"model":"/tmp/merged/adapter-0"}\n\ndata: [DONE]\n\n'
    )

    async def run(size: int) -> bytes:
        async def chunks():
            for i in range(0, len(data), size):
                yield data[i : i + size]

        return b"".join(
            [c async for c in _renamed_events(chunks(), "/tmp/merged/adapter-0", "lab/lora")]
        )

    for size in (1, 5, 7, 64, len(data)):
        out = asyncio.run(run(size))
        assert out == data.replace(b"/tmp/merged/adapter-0", b"lab/lora"), size
