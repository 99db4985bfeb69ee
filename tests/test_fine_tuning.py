"""Fine-tuning jobs train a real (tiny) model on CPU, through the server and a real worker."""

from __future__ import annotations

import pytest

from openweights.testing import conversations_rows, make_tiny_model, preference_rows, write_jsonl
from tests.test_e2e import worker_token

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """SQLite only: training is the same on either back end, and CPU time is scarce here."""
    from tests.conftest import Server, _server_env

    home = tmp_path_factory.mktemp("server-ft")
    srv = Server(home=home, env=_server_env(request, "sqlite", home)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def trainer_worker(server, ow, start_worker):
    # one training at a time on 2 cores
    return start_worker(
        server.url, worker_token(ow), "--any-hardware", env={"OMP_NUM_THREADS": "2"}
    )


SMALL = dict(
    epochs=1,
    max_steps=6,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=1,
    learning_rate=5e-3,
    r=4,
    lora_alpha=8,
    warmup_steps=0,
    max_seq_length=128,
    save_steps=1000,
)


def test_sft_lora_trains_logs_progress_samples_and_stores_adapter_and_merged_model(
    server, ow, trainer_worker, tiny_model, tmp_path
):
    import json

    train = ow.files.upload(
        str(write_jsonl(tmp_path / "train.jsonl", conversations_rows(32))), purpose="conversations"
    )["id"]
    prompts = conversations_rows(3, seed=5)
    for row in prompts:
        row["messages"] = row["messages"][:1]
    prompts_file = ow.files.upload(
        str(write_jsonl(tmp_path / "prompts.jsonl", prompts)), purpose="conversations"
    )["id"]
    test = ow.files.upload(
        str(write_jsonl(tmp_path / "test.jsonl", conversations_rows(8, seed=9))),
        purpose="conversations",
    )["id"]
    job = ow.fine_tuning.create(
        model=str(tiny_model),
        training_file=train,
        test_file=test,
        loss="sft",
        eval_every_n_steps=3,
        sampling_callbacks=[
            {"dataset": prompts_file, "eval_steps": 4, "tag": "samples", "max_tokens": 6}
        ],
        **{**SMALL, "save_steps": 3},
    )
    assert job.id.startswith("ftjob-") and job.type == "fine-tuning"
    fid = job.params["validated_params"]["finetuned_model_id"]
    assert fid.endswith(f"/model-{job.id}") and "{" not in fid
    job.wait(timeout=600)
    log = ow.files.content(job.runs[-1].log_file).decode()
    assert job.status == "completed", log[-3000:]
    events = [e["data"] for e in ow.events.list(job_id=job.id)]
    progress = [e for e in events if e.get("type") == "progress"]
    assert [e["step"] for e in progress] == list(range(1, 7))
    assert all(e["total_steps"] == 6 and "learning_rate" in e and "eta_s" in e for e in progress)
    evals = [e for e in events if "eval_loss" in e]
    assert [e["step"] for e in evals] == [3, 6]
    engine = next(e for e in events if e.get("type") == "engine")
    assert engine["device"] == "cpu" and engine["dtype"] == "float32"
    assert job.outputs["finetuned_model_id"] == fid
    # sampling: at step 4 and at the end, each a jsonl file with a completion per prompt
    samples = [e for e in events if e.get("tag") == "samples"]
    assert [e["step"] for e in samples] == [4, 6]
    for e in samples:
        rows = [json.loads(line) for line in ow.files.content(e["file"]).decode().splitlines()]
        assert [r["messages"] for r in rows] == [p["messages"] for p in prompts]
        assert all(isinstance(r["completion"], str) for r in rows)
    # the model event is the job's last event: the server registers the model from it
    own = [e for e in events if "path" not in e]
    assert own[-1] == {
        "type": "model",
        "name": fid,
        "base_model": str(tiny_model),
        "prefix": "uploads/model",
        "kind": "full",
    }
    out = tmp_path / "out"
    job.download(str(out))
    merged = out / "uploads" / "model"
    adapter = merged / "adapter"
    assert (merged / "config.json").exists() and (adapter / "adapter_config.json").exists()
    # checkpoints every save_steps, by TRL, under the model prefix
    assert sorted(p.name for p in merged.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert (merged / "checkpoint-3" / "adapter_model.safetensors").exists()
    assert len(list((out / "samples" / "samples").glob("step-*.jsonl"))) == 2
    # adapters name a base that resolves anywhere, not a worker's cache
    assert json.loads((adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tiny_model)

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "apple river"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids.shape[1]
    peft_model = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert peft_model.peft_config["default"].r == 4


def test_preference_file_for_sft_is_refused_at_create_naming_the_field(
    server, ow, tiny_model, tmp_path
):
    from openweights import OpenWeightsError

    pref = ow.files.upload(
        str(write_jsonl(tmp_path / "p.jsonl", preference_rows(4))), purpose="preference"
    )["id"]
    with pytest.raises(OpenWeightsError, match="training_file"):
        ow.fine_tuning.create(model=str(tiny_model), training_file=pref, loss="sft")
    with pytest.raises(OpenWeightsError, match="nonsense"):
        ow.fine_tuning.create(model=str(tiny_model), training_file=pref, loss="dpo", nonsense=1)


@pytest.fixture
def hub():
    from tests.hf_hub_double import HubDouble

    double = HubDouble().start()
    yield double
    double.stop()


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_preference_learning_trains_and_pushes_to_the_hub_when_the_org_has_a_token(
    server, ow, trainer_worker, tiny_model, tmp_path, loss, hub
):
    # the org's secrets reach the job: the model goes to the (local double of the) Hub too
    for name, value in {
        "HF_TOKEN": hub.token,
        "HF_ORG": "lab",
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
    }.items():
        ow.secrets.set(name, value)
    pref = ow.files.upload(
        str(write_jsonl(tmp_path / "p.jsonl", preference_rows(16))), purpose="preference"
    )["id"]
    job = ow.fine_tuning.create(
        model=str(tiny_model),
        training_file=pref,
        loss=loss,
        merge_before_push=False,
        **{**SMALL, "max_steps": 3, "save_steps": 2},
    )
    job.wait(timeout=600)
    log = ow.files.content(job.runs[-1].log_file).decode()
    assert job.status == "completed", log[-3000:]
    events = _events(ow, job)
    progress = [e for e in events if e.get("type") == "progress"]
    assert len(progress) == 3 and all(isinstance(e["loss"], float) for e in progress)
    fid = job.params["validated_params"]["finetuned_model_id"]
    repo_id = "lab/" + fid.split("/", 1)[1]
    pushed = next(e for e in events if e.get("type") == "hub")
    assert pushed["repo"] == repo_id and "error" not in pushed, pushed
    repo = hub.repos[repo_id]
    assert repo.private
    assert {"adapter_model.safetensors", "checkpoint-2/adapter_model.safetensors"} <= set(
        repo.files
    )


def _events(ow, job) -> list[dict]:
    return [e["data"] for e in ow.events.list(job_id=job.id)]


def test_a_registered_fine_tune_and_its_checkpoint_are_starting_points_by_name(
    server, ow, trainer_worker, tiny_model, tmp_path
):
    import json

    train = ow.files.upload(
        str(write_jsonl(tmp_path / "train.jsonl", conversations_rows(16))), purpose="conversations"
    )["id"]
    first = ow.fine_tuning.create(
        model=str(tiny_model),
        training_file=train,
        loss="sft",
        merge_before_push=False,
        **{**SMALL, "max_steps": 2, "save_steps": 1},
    ).wait(timeout=600)
    assert first.status == "completed", first.error
    model_event = next(e for e in _events(ow, first) if e.get("type") == "model")
    assert model_event["kind"] == "adapter" and model_event["prefix"] == "uploads/model"
    name = first.params["validated_params"]["finetuned_model_id"]
    registered = ow.models.retrieve(name)
    assert "adapter_config.json" in registered.files
    assert "checkpoint-1/adapter_config.json" in registered.files

    # a checkpoint of the registered adapter, by name: the adapter itself goes on training
    second = ow.fine_tuning.create(
        model=f"{name}/checkpoint-1",
        training_file=train,
        loss="sft",
        merge_before_push=False,
        **{**SMALL, "max_steps": 2, "r": 8},
    ).wait(timeout=600)
    assert second.status == "completed", second.error
    engine = next(e for e in _events(ow, second) if e.get("type") == "engine")
    assert engine["adapter"] and "training it further" in engine["note"]
    out = tmp_path / "second"
    second.download(str(out))
    config = json.loads((out / "uploads" / "model" / "adapter_config.json").read_text())
    # its own rank, on the original base (a reference any worker resolves, not a cache dir)
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_model)


@pytest.fixture(scope="module")
def unstable_model(tmp_path_factory, tiny_model):
    """The tiny model with every weight ×10: plain SGD without clipping diverges in a few steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("unstable") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return path


def test_diverging_training_fails_with_the_reason_and_keeps_finite_checkpoints(
    server, ow, trainer_worker, unstable_model, tmp_path
):
    from safetensors.torch import load_file

    train = ow.files.upload(
        str(write_jsonl(tmp_path / "train.jsonl", conversations_rows(32))), purpose="conversations"
    )["id"]
    job = ow.fine_tuning.create(
        model=str(unstable_model),
        training_file=train,
        loss="sft",
        is_peft=False,
        optim="sgd",
        max_grad_norm=0,
        train_on_responses_only=False,
        **{**SMALL, "learning_rate": 0.9, "max_steps": 30, "save_steps": 2},
    ).wait(timeout=600)
    assert job.status == "failed"
    assert "training diverged" in job.error
    events = _events(ow, job)
    assert any(e.get("type") == "error" and "diverged" in e["error"] for e in events)
    assert not any(e.get("type") == "model" for e in events)
    out = tmp_path / "out"
    job.download(str(out))
    checkpoints = sorted(
        (out / "uploads" / "model").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
    )
    assert checkpoints, "the checkpoints saved before the divergence are uploaded"
    import torch

    for checkpoint in checkpoints:
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), checkpoint.name


def test_bad_rows_are_refused_at_upload_or_create_naming_file_line_and_field(
    server, ow, tiny_model, tmp_path
):
    from openweights import OpenWeightsError

    def upload(name, rows, purpose="conversations"):
        return ow.files.upload(str(write_jsonl(tmp_path / name, rows)), purpose=purpose)["id"]

    good = conversations_rows(3)
    cases = [
        ({"messages": []}, r"empty.jsonl line 2, field messages: must not be empty"),
        (
            {"messages": [{"role": "bot", "content": "hi"}]},
            r"role.jsonl line 2, field messages\[0\]\.role: must be one of",
        ),
    ]
    for (bad, message), name in zip(cases, ["empty.jsonl", "role.jsonl"], strict=True):
        with pytest.raises(OpenWeightsError, match=message):
            upload(name, [good[0], bad, good[1]])
    pref = preference_rows(3)
    del pref[2]["chosen"]
    with pytest.raises(OpenWeightsError, match=r"pref.jsonl line 3, field chosen: required"):
        upload("pref.jsonl", pref, purpose="preference")

    # valid conversations (an inference prompt file, say), but nothing to train on
    prompts = [{"messages": r["messages"][:1]} for r in good]
    fid = upload("prompts.jsonl", [good[0], *prompts])
    with pytest.raises(
        OpenWeightsError,
        match=r"prompts.jsonl \(conversations:file-\w+\) line 2, field messages: no assistant message",
    ):
        ow.fine_tuning.create(model=str(tiny_model), training_file=fid, loss="sft")
    # ...and as a test file
    train = upload("train.jsonl", good)
    with pytest.raises(OpenWeightsError, match=r"prompts.jsonl .*line 2"):
        ow.fine_tuning.create(model=str(tiny_model), training_file=train, test_file=fid, loss="sft")
    # a preference row whose "chosen" has no assistant message
    pref = preference_rows(2)
    pref[1]["chosen"] = [{"role": "user", "content": "x"}]
    fid = upload("pref2.jsonl", pref, purpose="preference")
    with pytest.raises(
        OpenWeightsError, match=r"pref2.jsonl .*line 2, field chosen: needs an assistant"
    ):
        ow.fine_tuning.create(model=str(tiny_model), training_file=fid, loss="dpo")
    assert ow.jobs.list() == []


def test_row_longer_than_max_seq_length_without_truncation_fails_at_start(
    server, ow, trainer_worker, tiny_model, tmp_path
):
    rows = conversations_rows(4)
    rows[2]["messages"][1]["content"] = "apple " * 200
    fid = ow.files.upload(str(write_jsonl(tmp_path / "long.jsonl", rows)), purpose="conversations")[
        "id"
    ]
    job = ow.fine_tuning.create(
        model=str(tiny_model), training_file=fid, loss="sft", truncation=False, **SMALL
    ).wait(timeout=300)
    assert job.status == "failed"
    assert "long.jsonl" in job.error and "line 3, field messages" in job.error
    assert "max_seq_length=128" in job.error
    events = [e["data"] for e in ow.events.list(job_id=job.id)]
    assert not any(e.get("type") == "progress" for e in events)  # failed before training


def test_async_client_checks_rows_at_create_too(server, ow, api_key, tiny_model, tmp_path):
    import asyncio

    from openweights import AsyncOpenWeights, OpenWeightsError

    rows = conversations_rows(2) + [{"messages": [{"role": "user", "content": "no answer"}]}]
    fid = ow.files.upload(str(write_jsonl(tmp_path / "a.jsonl", rows)), purpose="conversations")[
        "id"
    ]

    async def create():
        async with AsyncOpenWeights(base_url=server.url, api_key=api_key) as aow:
            return await aow.fine_tuning.create(
                model=str(tiny_model), training_file=fid, loss="sft"
            )

    with pytest.raises(OpenWeightsError, match=r"a.jsonl .*line 3, field messages: no assistant"):
        asyncio.run(create())


def test_callback_schedule_and_fixed_output_dir():
    from openweights.jobs.fine_tuning.callbacks import due
    from openweights.jobs.fine_tuning.params import TrainingConfig

    assert [s for s in range(1, 301) if due(s, "log")] == [
        *range(1, 10),
        *range(10, 100, 10),
        *range(100, 301, 100),
    ]
    assert [s for s in range(0, 10) if due(s, 3)] == [3, 6, 9]
    base = dict(model="m", training_file="conversations:file-abc", loss="sft")
    assert TrainingConfig(**base).output_dir == "uploads/model"
    assert TrainingConfig(**base, output_dir="./tmp").output_dir == "uploads/model"
    with pytest.raises(ValueError, match="output_dir is fixed"):
        TrainingConfig(**base, output_dir="/data/run")


# ------------------------------------------------------------------ engines


def _choose(**overrides):
    from openweights.jobs.fine_tuning._engine import choose_engine

    probes = dict(
        use_unsloth=None,
        load_in_4bit=False,
        loss="sft",
        is_peft=True,
        from_adapter=False,
        cuda=True,
        bf16=True,
        unsloth_available=True,
        bnb_available=True,
    )
    return choose_engine(**{**probes, **overrides})


def test_engine_choice_follows_the_probes_and_use_unsloth():
    from openweights.jobs.fine_tuning._engine import EngineError

    # CUDA + unsloth installed: auto picks it for a new LoRA with SFT, in bf16
    e = _choose()
    assert (e.name, e.device, e.dtype, e.load_in_4bit, e.label) == (
        "unsloth",
        "cuda",
        "bfloat16",
        False,
        "unsloth+trl+peft",
    )
    assert _choose(load_in_4bit=True).load_in_4bit
    # forced off, or not installed: transformers (4-bit through bitsandbytes)
    assert _choose(use_unsloth=False).name == "transformers"
    e = _choose(unsloth_available=False, load_in_4bit=True)
    assert (e.name, e.dtype, e.load_in_4bit, e.notes) == ("transformers", "bfloat16", True, [])
    # auto skips unsloth where it does not apply, and says why
    e = _choose(loss="dpo")
    assert e.name == "transformers" and "use_unsloth=True" in e.notes[0]
    assert "new LoRA" in _choose(from_adapter=True).notes[0]
    assert "new LoRA" in _choose(is_peft=False).notes[0]
    assert _choose(loss="dpo", use_unsloth=True).name == "unsloth"  # opt-in for preferences
    # GPUs without bf16: float32 weights on the plain path, float16 with unsloth
    assert _choose(bf16=False).dtype == "float16"
    assert _choose(bf16=False, use_unsloth=False).dtype == "float32"
    # asked for but impossible on this CUDA worker: the job fails with the fix
    with pytest.raises(EngineError, match=r"unsloth is not installed.*openweights\[unsloth\]"):
        _choose(use_unsloth=True, unsloth_available=False)
    with pytest.raises(EngineError, match="new LoRA on a base model"):
        _choose(use_unsloth=True, from_adapter=True)
    with pytest.raises(EngineError, match=r"bitsandbytes.*openweights\[bnb\]"):
        _choose(use_unsloth=False, load_in_4bit=True, bnb_available=False)
    # CPU: transformers in float32 whatever was asked; what was ignored is said
    e = _choose(cuda=False, bf16=False, load_in_4bit=True, use_unsloth=True)
    assert (e.name, e.device, e.dtype, e.load_in_4bit) == ("transformers", "cpu", "float32", False)
    assert e.notes == [
        "CPU: training in float32",
        "load_in_4bit ignored: 4-bit needs CUDA and bitsandbytes; loading in float32",
        "use_unsloth ignored: unsloth needs CUDA",
    ]


def test_engine_probes_do_not_import_unsloth_and_the_entry_imports_no_trainer_early(tiny_model):
    """unsloth must be imported before transformers/TRL/PEFT: up to the engine choice, the job
    process has imported none of them (and the probes import nothing)."""
    import subprocess
    import sys

    code = f"""
import sys
from openweights.jobs.fine_tuning import entry
from openweights.jobs.fine_tuning._engine import is_bitsandbytes_available, is_unsloth_available
from openweights.jobs.model_source import resolve_model
from openweights.jobs.weighted_sft import entry as weighted_entry
is_unsloth_available(), is_bitsandbytes_available()
resolve_model({str(tiny_model)!r})
print(sorted(m for m in ("transformers", "trl", "peft", "unsloth", "bitsandbytes") if m in sys.modules))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_use_unsloth_and_load_in_4bit_are_validated_at_create(server, ow, tiny_model, tmp_path):
    from openweights import OpenWeightsError

    train = ow.files.upload(
        str(write_jsonl(tmp_path / "t.jsonl", conversations_rows(4))), purpose="conversations"
    )["id"]
    with pytest.raises(OpenWeightsError, match="load_in_4bit: 4-bit weights cannot be trained"):
        ow.fine_tuning.create(
            model=str(tiny_model), training_file=train, loss="sft", load_in_4bit=True, is_peft=False
        )
    with pytest.raises(OpenWeightsError, match="use_unsloth"):
        ow.fine_tuning.create(
            model=str(tiny_model), training_file=train, loss="sft", use_unsloth="fast"
        )
    from openweights.jobs.fine_tuning.params import TrainingConfig

    assert TrainingConfig.model_fields["use_unsloth"].default is None
    assert "CPU worker ignores it" in TrainingConfig.model_fields["load_in_4bit"].description


def test_cpu_worker_ignores_4bit_and_unsloth_and_says_so_in_the_engine_event(
    server, ow, trainer_worker, tiny_model, tmp_path
):
    train = ow.files.upload(
        str(write_jsonl(tmp_path / "train.jsonl", conversations_rows(8))), purpose="conversations"
    )["id"]
    job = ow.fine_tuning.create(
        model=str(tiny_model),
        training_file=train,
        loss="sft",
        load_in_4bit=True,
        use_unsloth=True,
        **{**SMALL, "max_steps": 2},
    ).wait(timeout=600)
    assert job.status == "completed", job.error
    assert job.params["validated_params"]["use_unsloth"] is True
    engine = next(e for e in _events(ow, job) if e.get("type") == "engine")
    assert engine["device"] == "cpu" and engine["dtype"] == "float32"
    assert engine["engine"] == "transformers+trl+peft"
    assert engine["load_in_4bit"] is False and engine["unsloth"] is False
    assert "load_in_4bit ignored" in engine["note"] and "use_unsloth ignored" in engine["note"]


# ------------------------------------------------------------------ GPU (a lent machine)


@pytest.fixture
def cuda_gpu():
    """torch, on a CUDA machine; first in a test's fixtures so that it skips before any worker
    starts."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch


GPU_ENGINES = [
    pytest.param(dict(use_unsloth=False), "transformers", False, id="bf16"),
    pytest.param(dict(use_unsloth=False, load_in_4bit=True), "transformers", True, id="4bit"),
    pytest.param(dict(use_unsloth=True), "unsloth", False, id="unsloth"),
    pytest.param(dict(use_unsloth=True, load_in_4bit=True), "unsloth", True, id="unsloth-4bit"),
]


@pytest.mark.requires_gpu
@pytest.mark.parametrize("asks,engine_name,four_bit", GPU_ENGINES)
def test_gpu_fine_tune_trains_with_each_engine_and_reports_it(
    cuda_gpu, server, ow, trainer_worker, tiny_model, tmp_path, asks, engine_name, four_bit
):
    """On a lent GPU: SFT with eval, sampling and a merged model, on the engine asked for."""
    torch = cuda_gpu
    from openweights.jobs.fine_tuning._engine import (
        is_bitsandbytes_available,
        is_unsloth_available,
    )

    if engine_name == "unsloth" and not is_unsloth_available():
        pytest.skip('unsloth is not installed: pip install "openweights[unsloth]"')
    if four_bit and not is_bitsandbytes_available():
        pytest.skip('bitsandbytes is not installed: pip install "openweights[bnb]"')
    train = ow.files.upload(
        str(write_jsonl(tmp_path / "train.jsonl", conversations_rows(32))), purpose="conversations"
    )["id"]
    test = ow.files.upload(
        str(write_jsonl(tmp_path / "test.jsonl", conversations_rows(8, seed=9))),
        purpose="conversations",
    )["id"]
    prompts = conversations_rows(2, seed=5)
    for row in prompts:
        row["messages"] = row["messages"][:1]
    prompts_file = ow.files.upload(
        str(write_jsonl(tmp_path / "prompts.jsonl", prompts)), purpose="conversations"
    )["id"]
    job = ow.fine_tuning.create(
        model=str(tiny_model),
        training_file=train,
        test_file=test,
        loss="sft",
        eval_every_n_steps=3,
        sampling_callbacks=[{"dataset": prompts_file, "eval_steps": 3, "max_tokens": 6}],
        **{**SMALL, "optim": "adamw_torch"},
        **asks,
    ).wait(timeout=600)
    log = ow.files.content(job.runs[-1].log_file).decode(errors="replace")
    assert job.status == "completed", log[-4000:]
    events = _events(ow, job)
    engine = next(e for e in events if e.get("type") == "engine")
    bf16 = torch.cuda.is_bf16_supported()
    assert engine["device"] == "cuda" and engine["engine"] == f"{engine_name}+trl+peft"
    assert engine["dtype"] == (
        "bfloat16" if bf16 else "float32" if engine_name != "unsloth" else "float16"
    )
    assert engine["load_in_4bit"] is four_bit and engine["unsloth"] is (engine_name == "unsloth")
    assert [e["step"] for e in events if "eval_loss" in e] == [3, 6]
    assert [e["step"] for e in events if e.get("tag") == "samples"] == [3, 6]
    out = tmp_path / "out"
    job.download(str(out))
    merged = out / "uploads" / "model"
    assert (merged / "config.json").exists()
    assert (merged / "adapter" / "adapter_config.json").exists()
    # the merged model is full precision (a 4-bit base is merged onto a fresh full copy)
    import json

    assert "quantization_config" not in json.loads((merged / "config.json").read_text())


def test_a_base_stored_quantized_is_not_merged(tiny_model, tmp_path):
    """merge_before_push on a `...-bnb-4bit` base would save 4-bit weights: the adapter is kept."""
    import json
    import shutil

    from openweights.jobs.fine_tuning.entry import _prequantized

    quantized = tmp_path / "bnb-4bit"
    shutil.copytree(tiny_model, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    assert not _prequantized(str(tiny_model))
    assert _prequantized(str(quantized))


def test_sampling_switches_an_unsloth_model_to_inference_and_back(tiny_model, monkeypatch):
    """unsloth's documented toggles around generation (a stand-in `unsloth` module on CPU)."""
    import sys
    import types

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openweights.jobs.fine_tuning.callbacks import generate

    calls: list[str] = []

    class FastLanguageModel:
        @staticmethod
        def for_inference(model):
            calls.append("for_inference")

        @staticmethod
        def for_training(model):
            calls.append("for_training")

    monkeypatch.setitem(
        sys.modules, "unsloth", types.SimpleNamespace(FastLanguageModel=FastLanguageModel)
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    chats = [[{"role": "user", "content": "apple river"}]]
    model.train()
    assert len(generate(model, tok, chats, max_tokens=3)) == 1
    assert calls == [] and model.training  # not an unsloth model: untouched
    model.config.unsloth_version = "test"
    assert len(generate(model, tok, chats, max_tokens=3)) == 1
    assert calls == ["for_inference", "for_training"] and model.training
