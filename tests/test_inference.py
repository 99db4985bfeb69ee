"""Batch inference jobs generate with a real (tiny) model on CPU, through the server and real workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from openweights.testing import conversations_rows, make_tiny_model, preference_rows, write_jsonl
from tests.conftest import ROOT, base_env, wait_until
from tests.test_e2e import descendants, worker_token

pytestmark = pytest.mark.filterwarnings("ignore")

#: Hub ids must fail fast offline instead of retrying for minutes.
#: One thread: on a loaded 2-core machine two OpenMP threads spin against each other (10× slower).
WORKER_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """SQLite only: inference is the same on either back end, and CPU time is scarce here."""
    from tests.conftest import Server, _server_env

    home = tmp_path_factory.mktemp("server-inf")
    srv = Server(home=home, env=_server_env(request, "sqlite", home)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mow(server):
    """One org for the module, so one worker serves all its jobs."""
    from openweights import OpenWeights

    client = OpenWeights(base_url=server.url, api_key=server.signup("inference"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def worker(server, mow, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inf-worker")
    env = base_env(tmp / "home")
    env.update(WORKER_ENV)
    log = tmp / "worker.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "openweights.worker", "--url", server.url, "--token",
         worker_token(mow), "--name", "inf", "--any-hardware"],
        env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=tmp,
        start_new_session=True,
    )  # fmt: skip
    yield proc
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def upload_rows(ow, tmp_path, rows, name="prompts.jsonl"):
    return ow.files.upload(str(write_jsonl(tmp_path / name, rows)), purpose="conversations").id


def results(ow, job) -> list[dict]:
    text = ow.files.content(job.outputs["file"]).decode()
    return [json.loads(line) for line in text.splitlines()]


def log_of(ow, job) -> str:
    return ow.files.content(job.runs[-1].log_file).decode(errors="replace")


def prompt_rows() -> list[dict]:
    rows = conversations_rows(6)
    questions = [{"messages": r["messages"][:1], "tag": i} for i, r in enumerate(rows[:4])]
    prefilled = [  # ends with an assistant message: continued, not answered
        {"messages": [*rows[4]["messages"][:1], {"role": "assistant", "content": "<response>ap"}]}
    ]
    return [*questions, *prefilled, {"text": "apple river stone"}]


# ------------------------------------------------------------------ create-time validation


def test_create_refuses_bad_params_naming_the_field(server, ow, tiny_model, tmp_path):
    from openweights import OpenWeightsError

    prompts = upload_rows(ow, tmp_path, prompt_rows())
    pref = ow.files.upload(
        str(write_jsonl(tmp_path / "p.jsonl", preference_rows(2))), purpose="preference"
    ).id
    with pytest.raises(OpenWeightsError, match="input_file_id.*'preference' file"):
        ow.inference.create(model=str(tiny_model), input_file_id=pref)
    with pytest.raises(OpenWeightsError, match="input_file_id.*not a file id"):
        ow.inference.create(model=str(tiny_model), input_file_id="prompts.jsonl")
    with pytest.raises(OpenWeightsError, match="max_tokens.*max_model_len=64"):
        ow.inference.create(
            model=str(tiny_model), input_file_id=prompts, max_tokens=100, max_model_len=64
        )
    with pytest.raises(OpenWeightsError, match="min_tokens"):
        ow.inference.create(
            model=str(tiny_model), input_file_id=prompts, max_tokens=5, min_tokens=6
        )
    with pytest.raises(OpenWeightsError, match="nonsense"):
        ow.inference.create(model=str(tiny_model), input_file_id=prompts, nonsense=1)
    assert ow.jobs.list() == []  # nothing was submitted

    job = ow.inference.create(model=str(tiny_model), input_file_id=prompts)
    assert job.id.startswith("inferencejobs-") and job.type == "inference"
    vp = job.params["validated_params"]
    assert (vp["max_tokens"], vp["temperature"], vp["top_p"], vp["min_tokens"]) == (
        600,
        1.0,
        1.0,
        1,
    )
    assert (vp["max_model_len"], vp["n_completions_per_prompt"], vp["prefill"]) == (8196, 1, "")
    assert job.requires_vram_gb < 2  # guessed from the tiny model's weight files
    assert ow.inference.create(model=str(tiny_model), input_file_id=prompts).id == job.id
    again = ow.inference.create(model=str(tiny_model), input_file_id=prompts, job_id_suffix="b")
    assert again.id.startswith("inferencejobs-") and again.id.endswith("-b") and again.id != job.id


# ------------------------------------------------------------------ generation


def _engine(tiny_model, **params):
    from openweights.jobs.inference.engines import TransformersEngine
    from openweights.jobs.inference.params import InferenceConfig
    from openweights.jobs.model_source import resolve_model

    cfg = InferenceConfig(
        model=str(tiny_model), input_file_id="conversations:file-000000000000", **params
    )
    return TransformersEngine.load(resolve_model(cfg.model), cfg), cfg


@pytest.mark.parametrize(
    ("model", "gb"),
    [
        ("unsloth/Qwen3-4B", 23.0),
        ("meta-llama/Llama-3.3-70B-Instruct", 155.0),
        ("unsloth/llama-3-8b-Instruct", 31.0),
        ("Qwen/Qwen2.5-0.5B-Instruct", 16.0),
        ("unsloth/Llama-3.3-70B-Instruct-bnb-4bit", 50.0),
        # a registered fine-tune's name carries a job id whose hex digits are no size
        ("org-1/Qwen3-4B-ftjob-3f2a123456b0", 23.0),
        ("org-1/tiny-ftjob-123456789b", 79.0),
    ],
)
def test_vram_guess_reads_the_size_from_the_name_never_from_a_job_id(model, gb):
    from openweights.jobs.inference.params import guess_vram_gb

    assert guess_vram_gb(model) == gb


def test_prefill_starts_each_answer_and_a_trailing_assistant_message_is_continued(tiny_model):
    from openweights.jobs.inference.engines import render_prompts

    engine, cfg = _engine(tiny_model, prefill="<response>")
    tok = engine.tokenizer
    rows = prompt_rows()[:5]  # four questions, then one that ends with "<response>ap"
    prompts = render_prompts(list(enumerate(rows, 1)), tok, cfg, model_name=cfg.model)
    texts = [tok.decode(p.ids) for p in prompts]
    for row, text in zip(rows[:4], texts[:4], strict=True):
        q = row["messages"][0]["content"]
        assert text.endswith(f"{q}<|im_end|>\n<|im_start|>assistant\n<response>")
    assert texts[4].endswith("<|im_start|>assistant\n<response>ap")  # its own start, no prefill


def test_a_sampled_pad_token_is_kept_without_stop_strings(tiny_model):
    """The engine trims trailing pad tokens only where stop strings pad a finished sequence; a
    pad token the model sampled last (p ~ 1/369 per token here) used to make a
    min_tokens=max_tokens row one token short (a ~6 % flake of the SIGKILL retry test)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openweights.jobs.inference.engines import Prompt, TransformersEngine
    from openweights.jobs.inference.params import InferenceConfig

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    kw = {"model": str(tiny_model), "input_file_id": "conversations:file-x", "max_tokens": 4}
    prompt = Prompt(index=0, line=1, ids=[5, 6, 7])
    ids = torch.tensor([9, 10, 11, tok.pad_token_id])
    plain = TransformersEngine(model, tok, InferenceConfig(**kw), device="cpu")
    assert plain._finish(prompt, ids, None)["completion_tokens"] == 4
    stopped = TransformersEngine(model, tok, InferenceConfig(**kw, stop=["zz"]), device="cpu")
    assert stopped._finish(prompt, ids, None)["completion_tokens"] == 3  # padding after a stop


def test_same_seed_same_samples_and_stop_string_rule(tiny_model):
    from openweights.jobs.inference.engines import _first_stop, render_prompts

    rows = [{"messages": r["messages"][:1]} for r in conversations_rows(4)]

    def sample(seed: int) -> list:
        engine, cfg = _engine(tiny_model, max_tokens=6, temperature=1.0, seed=seed)
        prompts = render_prompts(list(enumerate(rows, 1)), engine.tokenizer, cfg, model_name="m")
        return [o["completion"] for b in engine.generate(prompts) for _, o in b]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    # a stop string counts only where it ends after the first min_tokens' text
    assert _first_stop("abXcdX", ["X"], 0) == 2
    assert _first_stop("abXcdX", ["X"], 3) == 5
    assert _first_stop("abXYcd", ["XY"], 3) == 2  # ends after char 3: counts
    assert _first_stop("abcd", ["X"], 0) is None


def test_inference_returns_every_row_with_completion_counts_and_logprobs(
    server, mow, worker, tiny_model, tmp_path
):
    from transformers import AutoTokenizer

    rows = prompt_rows()
    job = mow.inference.create(
        model=str(tiny_model),
        input_file_id=upload_rows(mow, tmp_path, rows),
        max_tokens=8,
        min_tokens=8,
        temperature=0.8,
        n_completions_per_prompt=2,
        logprobs=2,
        seed=1,
        max_num_seqs=4,
    )
    job.wait(timeout=300)
    assert job.status == "completed", log_of(mow, job)[-3000:]
    out = results(mow, job)
    assert len(out) == len(rows)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for row, got in zip(rows, out, strict=True):
        assert {k: got[k] for k in row} == row  # the input row comes back whole
        assert isinstance(got["completion"], list) and len(got["completion"]) == 2
        assert all(isinstance(c, str) for c in got["completion"])
        assert got["completion_tokens"] == [8, 8] and got["finish_reason"] == ["length"] * 2
        assert [len(lp) for lp in got["logprobs"]] == [8, 8]
        entry = got["logprobs"][0][0]
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        if "messages" in row:
            ends_with_assistant = row["messages"][-1]["role"] == "assistant"
            text = tok.apply_chat_template(
                row["messages"],
                tokenize=False,
                add_generation_prompt=not ends_with_assistant,
                continue_final_message=ends_with_assistant,
            )
            assert got["prompt_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])
            if ends_with_assistant:
                assert text.endswith("<response>ap")  # continued: no end of turn, no new turn
        else:
            assert got["prompt_tokens"] == len(tok(row["text"])["input_ids"])
    summary = job.outputs
    assert summary["rows"] == len(rows) and summary["completion_tokens"] == 8 * 2 * len(rows)
    events = [e["data"] for e in mow.events.list(job_id=job.id)]
    engine = next(e for e in events if e.get("type") == "engine")
    assert engine["engine"] == "transformers" and engine["device"] == "cpu"


def test_min_tokens_holds_back_stop_strings_and_stop_strings_cut_the_completion(tiny_model):
    """Engine semantics in-process (the job path is the same code, exercised by the tests above)."""
    from openweights.jobs.inference.engines import render_prompts

    # Nearly every token of the tiny vocabulary decodes to one of these characters.
    stop = list("aeioursnt ")
    rows = [{"messages": r["messages"][:1]} for r in conversations_rows(8)]

    def run(min_tokens: int) -> list[dict]:
        engine, cfg = _engine(tiny_model, max_tokens=16, stop=stop, seed=0, min_tokens=min_tokens)
        prompts = render_prompts(list(enumerate(rows, 1)), engine.tokenizer, cfg, model_name="m")
        return [o for b in engine.generate(prompts) for _, o in b]

    free_rows, held_rows = run(0), run(6)
    assert min(r["completion_tokens"] for r in free_rows) < 6
    assert all(r["completion_tokens"] >= 6 for r in held_rows)
    for r in free_rows:
        if r["finish_reason"] == "stop" and r["completion_tokens"] < 16:
            assert not any(s in r["completion"] for s in stop), r  # cut before the stop string


def test_sigkilled_worker_retry_generates_only_the_missing_rows(
    server, ow, start_worker, tiny_model, tmp_path
):
    n = 24
    rows = [{"messages": r["messages"][:1], "i": i} for i, r in enumerate(conversations_rows(n))]
    job = ow.inference.create(
        model=str(tiny_model),
        input_file_id=upload_rows(ow, tmp_path, rows),
        max_tokens=24,
        min_tokens=24,
        max_num_seqs=2,
        save_every_s=0,
        max_attempts=3,
    )
    token = worker_token(ow)
    a = start_worker(server.url, token, "--any-hardware", name="a", env=WORKER_ENV)

    def chunks():
        return [
            e for e in ow.events.list(job_id=job.id) if e["data"].get("type") == "inference_chunk"
        ]

    wait_until(chunks, 240, "a first saved chunk", interval_s=0.05)
    for pid in [a.proc.pid, *descendants(a.proc.pid)]:  # the whole pod dies: worker and job
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    a.proc.wait()
    first = chunks()
    start_worker(server.url, token, "--any-hardware", name="b", env=WORKER_ENV)
    job.wait(timeout=300)
    assert job.status == "completed", log_of(ow, job)[-3000:]
    runs = job.runs
    assert [r.status for r in runs] == ["lost", "completed"]

    def indices(events) -> list[int]:
        out = []
        for e in events:
            text = ow.files.content(e["data"]["chunk_file"]).decode()
            out += [json.loads(line)["index"] for line in text.splitlines()]
        return out

    all_chunks = chunks()
    before = indices([e for e in all_chunks if e["run_id"] == runs[0].id])
    after = indices([e for e in all_chunks if e["run_id"] == runs[1].id])
    assert before and len(before) == len(set(before)) == len(indices(first))
    assert len(before) < n, "the job finished before the kill; make it longer"
    assert sorted(before + after) == list(range(n))  # nothing redone, nothing missing
    assert job.outputs["resumed_rows"] == len(before)
    assert job.outputs["generated_rows"] == n - len(before)
    out = results(ow, job)
    assert [r["i"] for r in out] == list(range(n))
    assert all(r["completion_tokens"] == 24 and isinstance(r["completion"], str) for r in out)


# ------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory):
    """A LoRA adapter on the tiny model, made with PEFT; its config names the base by path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    config = LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    return out


def _greedy(local, messages) -> str:
    import torch

    from openweights.jobs.model_source import load_model

    model, tok = load_model(local, merge=bool(local.adapter))
    ids = tok(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
        return_tensors="pt",
    )["input_ids"]
    with torch.inference_mode():
        gen = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    return tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)


def test_lora_adapter_dir_runs_on_the_base_named_in_its_config(
    server, mow, worker, tiny_model, adapter_dir, tmp_path
):
    from openweights.jobs.model_source import resolve_model

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)
    messages = conversations_rows(1, seed=5)[0]["messages"][:1]
    job = mow.inference.create(
        model=str(adapter_dir),
        input_file_id=upload_rows(mow, tmp_path, [{"messages": messages}]),
        max_tokens=10,
        min_tokens=10,
        temperature=0,
    )
    job.wait(timeout=300)
    assert job.status == "completed", log_of(mow, job)[-3000:]
    engine = next(
        e["data"] for e in mow.events.list(job_id=job.id) if e["data"].get("type") == "engine"
    )
    assert engine["base"] == str(tiny_model) and engine["adapter"] == str(adapter_dir)
    got = results(mow, job)[0]["completion"]
    with_adapter = _greedy(resolve_model(str(adapter_dir)), messages)
    without = _greedy(resolve_model(str(tiny_model)), messages)
    assert with_adapter != without  # the adapter changes the answer …
    assert got == with_adapter  # … and the job applied it


def test_unknown_model_adapter_without_base_and_too_long_prompt_fail_with_clear_errors(
    server, mow, worker, tiny_model, adapter_dir, tmp_path
):
    import shutil

    orphan = tmp_path / "orphan-adapter"
    shutil.copytree(adapter_dir, orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone-base")
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    prompts = upload_rows(mow, tmp_path, prompt_rows())
    cases = {
        "nobody-here/no-such-model-4b": r"model 'nobody-here/no-such-model-4b'",
        str(orphan): rf"model '{orphan}' cannot be used: .*gone-base",
    }
    jobs = {
        m: mow.inference.create(model=m, input_file_id=prompts, max_attempts=1, requires_vram_gb=0)
        for m in cases
    }
    too_long = mow.inference.create(
        model=str(tiny_model), input_file_id=prompts, max_tokens=4, max_model_len=12
    )
    import re

    for m, pattern in cases.items():
        job = jobs[m].wait(timeout=300)
        assert job.status == "failed"
        assert re.search(pattern, job.error or ""), job.error
    too_long.wait(timeout=300)
    assert too_long.status == "failed"
    assert re.search(r"line 1: the prompt is \d+ tokens; max_model_len=12", too_long.error or "")
    # no result file was stored for any of them
    for job in [*jobs.values(), too_long]:
        assert "file" not in (job.outputs or {})


def test_finetuned_model_id_of_an_earlier_fine_tune_is_a_model(
    server, mow, worker, tiny_model, tmp_path
):
    train = mow.files.upload(
        str(write_jsonl(tmp_path / "train.jsonl", conversations_rows(8))), purpose="conversations"
    ).id
    ft = mow.fine_tuning.create(
        model=str(tiny_model),
        training_file=train,
        loss="sft",
        max_steps=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        r=4,
        lora_alpha=8,
        max_seq_length=64,
        merge_before_push=False,
    )
    ft.wait(timeout=600)
    assert ft.status == "completed", log_of(mow, ft)[-3000:]
    name = ft.params["validated_params"]["finetuned_model_id"]
    assert mow.models.retrieve(name).id == name
    job = mow.inference.create(
        model=name,
        input_file_id=upload_rows(mow, tmp_path, prompt_rows()),
        max_tokens=4,
        min_tokens=4,
    )
    job.wait(timeout=300)
    assert job.status == "completed", log_of(mow, job)[-3000:]
    engine = next(
        e["data"] for e in mow.events.list(job_id=job.id) if e["data"].get("type") == "engine"
    )
    assert engine["base"] == str(tiny_model) and engine["adapter"]  # the registered adapter
    assert all(r["completion_tokens"] == 4 for r in results(mow, job))


def test_cookbook_inference_runs_on_the_tiny_model(server, mow, worker, tiny_model):
    env = base_env(ROOT / ".never-used-home")
    env.update(
        OPENWEIGHTS_URL=server.url,
        OPENWEIGHTS_API_KEY=mow.api_key,
        OW_COOKBOOK_MODEL=str(tiny_model),
        OW_COOKBOOK_MAX_TOKENS="16",
    )
    out = subprocess.run(
        [sys.executable, "run_inference.py"],
        cwd=ROOT / "cookbook" / "inference",
        env=env,
        capture_output=True,
        timeout=300,
    )
    # Bytes, not text: the tiny model samples any token, "\r" included, which text mode would
    # turn into "\n" and so no longer match the stored completion.
    stdout = out.stdout.decode("utf-8", "replace")
    assert out.returncode == 0, stdout[-3000:] + out.stderr.decode("utf-8", "replace")[-3000:]
    job = next(j for j in mow.inference.list() if j.params["validated_params"]["max_tokens"] == 16)
    first = results(mow, job)[0]
    assert first["messages"][0]["content"] in stdout
    assert first["completion"] in stdout and first["completion_tokens"] >= 1
    assert len(results(mow, job)) == 3


# ------------------------------------------------------------------ GPU


@pytest.mark.requires_gpu
def test_vllm_engine_generates_with_and_without_lora(tiny_model, adapter_dir, tmp_path):
    """On a lent GPU with vLLM installed: the vLLM engine, base and LoRA, with the same outputs shape."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from openweights.jobs.inference.engines import VllmEngine, render_prompts
    from openweights.jobs.inference.params import InferenceConfig
    from openweights.jobs.model_source import resolve_model

    rows = [(i + 1, r) for i, r in enumerate(prompt_rows())]
    for model in (str(tiny_model), str(adapter_dir)):
        cfg = InferenceConfig(
            model=model,
            input_file_id="conversations:file-000000000000",
            max_tokens=8,
            min_tokens=8,
            logprobs=1,
            n_completions_per_prompt=2,
            max_model_len=256,
            seed=0,
        )
        engine = VllmEngine.load(resolve_model(model), cfg, n_gpus=1)
        prompts = render_prompts(rows, engine.tokenizer, cfg, model_name=model)
        outs = [o for batch in engine.generate(prompts) for _, o in batch]
        assert len(outs) == len(rows)
        assert all(o["completion_tokens"] == [8, 8] for o in outs)
        assert all(len(o["logprobs"][0]) == 8 for o in outs)
        del engine
