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


def test_sft_lora_trains_logs_progress_and_stores_adapter_and_merged_model(
    server, ow, trainer_worker, tiny_model, tmp_path
):
    train = ow.files.upload(
        str(write_jsonl(tmp_path / "train.jsonl", conversations_rows(32))), purpose="conversations"
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
        **SMALL,
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
    out = tmp_path / "out"
    job.download(str(out))
    adapter = next(out.rglob("adapter_config.json")).parent
    merged = next(p.parent for p in out.rglob("config.json") if "merged" in str(p))

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


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
def test_preference_learning_trains(server, ow, trainer_worker, tiny_model, tmp_path, loss):
    pref = ow.files.upload(
        str(write_jsonl(tmp_path / "p.jsonl", preference_rows(16))), purpose="preference"
    )["id"]
    job = ow.fine_tuning.create(
        model=str(tiny_model),
        training_file=pref,
        loss=loss,
        merge_before_push=False,
        **{**SMALL, "max_steps": 3},
    )
    job.wait(timeout=600)
    log = ow.files.content(job.runs[-1].log_file).decode()
    assert job.status == "completed", log[-3000:]
    progress = [
        e["data"] for e in ow.events.list(job_id=job.id) if e["data"].get("type") == "progress"
    ]
    assert len(progress) == 3 and all(isinstance(e["loss"], float) for e in progress)
