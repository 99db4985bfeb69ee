"""The model registry: a job declares a model, its completed run registers it, any job loads it by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from openweights.testing import make_tiny_model
from tests.test_e2e import script_job, worker_token

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def model_tree(tmp_path_factory):
    """A real tiny base model, and a model root that is a LoRA adapter with a checkpoint beside it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("registry")
    base = make_tiny_model(root / "base")
    tree = root / "tree"
    for sub, r in (("", 4), ("checkpoint-2", 2)):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=r, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        )
        model.save_pretrained(tree / sub if sub else tree)
    return base, tree


def _declaring_job(ow, src, name, *, kind="adapter", exit_code=0, **kw):
    event = json.dumps(
        {
            "type": "model",
            "name": name,
            "prefix": "uploads/model",
            "kind": kind,
            "base_model": "tiny",
        }
    )
    log = f"from openweights import OpenWeights; OpenWeights().run.log({event})"
    script = f"cp -r {src} uploads/model && python -c '{log}' && exit {exit_code}"
    return script_job(ow, script, **kw)


def test_completed_job_registers_its_model_and_jobs_load_it_by_name(
    server, ow, start_worker, model_tree, tmp_path, monkeypatch
):
    from openweights.jobs.model_source import load_model, resolve_model

    base, tree = model_tree
    start_worker(server.url, worker_token(ow))
    name = "lab/tiny-lora"
    job = _declaring_job(ow, tree, name, tag="ok")
    job.wait(timeout=120)
    assert job.status == "completed", job.error

    listed = ow.models.list()
    assert [m.id for m in listed] == [name]
    model = ow.models.retrieve(name)
    assert model.kind == "adapter" and model.job_id == job.id and model.base_model == "tiny"
    assert model.checkpoints == ["checkpoint-2"]
    assert (
        "adapter_config.json" in model.files and "checkpoint-2/adapter_config.json" in model.files
    )
    assert model.bytes == sum(ow.files.retrieve(f).bytes for f in set(model.files.values()))

    # The OpenAI client shape: /v1/models is a list of {id, object: "model", owned_by}
    body = ow._http.request("GET", "/v1/models").json()
    assert body["object"] == "list" and body["data"][0]["object"] == "model"

    # A worker resolves the name from openweights' own storage: the adapter, its base from its config.
    monkeypatch.setenv("OPENWEIGHTS_MODEL_CACHE", str(tmp_path / "cache"))
    m = resolve_model(name, ow=ow)
    assert m.adapter and m.base == str(base) and m.registered["id"] == name
    peft_model, tok = load_model(m)
    assert peft_model.peft_config["default"].r == 4
    ck = resolve_model(f"{name}/checkpoint-2", ow=ow)
    assert ck.adapter != m.adapter and ck.base == str(base)
    assert load_model(ck)[0].peft_config["default"].r == 2
    # downloaded once: a second resolve reuses the cache
    assert resolve_model(name, ow=ow).adapter == m.adapter

    out = ow.models.download(name, tmp_path / "dl", subfolder="checkpoint-2")
    assert (out / "adapter_config.json").exists() and not (out / "checkpoint-2").exists()

    with pytest.raises(Exception, match="no subfolder 'checkpoint-9'"):
        resolve_model(f"{name}/checkpoint-9", ow=ow)

    # the CLI: names when piped, JSON for one, a download ready for from_pretrained
    env = {**os.environ, "OPENWEIGHTS_URL": server.url, "OPENWEIGHTS_API_KEY": ow.api_key}
    ls = subprocess.run(["ow", "models", "ls"], env=env, capture_output=True, text=True)
    assert ls.returncode == 0 and ls.stdout.split() == [name], ls.stderr
    show = subprocess.run(["ow", "models", "show", name], env=env, capture_output=True, text=True)
    assert json.loads(show.stdout)["checkpoints"] == ["checkpoint-2"]
    dl = subprocess.run(
        ["ow", "models", "download", name, str(tmp_path / "cli")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert dl.returncode == 0 and (tmp_path / "cli" / "adapter_config.json").exists(), dl.stderr
    missing = subprocess.run(
        ["ow", "models", "show", "lab/nope"], env=env, capture_output=True, text=True
    )
    assert missing.returncode != 0 and "lab/nope" in missing.stderr


def test_failed_job_registers_nothing_and_other_orgs_see_nothing(
    server, ow, start_worker, model_tree, tmp_path
):
    from openweights import NotFoundError, OpenWeights, signup

    _, tree = model_tree
    start_worker(server.url, worker_token(ow))
    job = _declaring_job(ow, tree, "lab/broken", exit_code=3, tag="fails", max_attempts=1)
    job.wait(timeout=120)
    assert job.status == "failed"
    with pytest.raises(NotFoundError, match="lab/broken"):
        ow.models.retrieve("lab/broken")

    full = tmp_path / "full"
    shutil.copytree(model_tree[0], full)
    job = _declaring_job(ow, full, "lab/full", kind="full", tag="full")
    job.wait(timeout=120)
    assert ow.models.retrieve("lab/full").kind == "full"

    other = OpenWeights(
        base_url=server.url, api_key=signup("other-org", base_url=server.url).token.token
    )
    assert other.models.list() == []
    with pytest.raises(NotFoundError):
        other.models.retrieve("lab/full")
    with pytest.raises(NotFoundError):
        other.models.delete("lab/full")
    assert ow.models.delete("lab/full").id == "lab/full"
    assert [m.id for m in ow.models.list()] == []
