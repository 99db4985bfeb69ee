"""Token-weighted SFT: weights map to exact tokens of the real tiny tokenizer, the loss is the
weighted one, and a training job completes through the server and a real worker."""

from __future__ import annotations

import pytest

from openweights.testing import make_tiny_model, weighted_rows, write_jsonl
from tests.test_e2e import worker_token

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def block(text, weight=None, tag=None):
    b = {"type": "text", "text": text}
    if weight is not None:
        b["weight"] = weight
    if tag is not None:
        b["tag"] = tag
    return b


def test_each_token_has_its_blocks_weight_and_template_tokens_none(tokenizer):
    from openweights.jobs.weighted_sft.blocks import tokenize_conversation

    for row in weighted_rows(8):
        t = tokenize_conversation(tokenizer, row["messages"])
        plain = [
            {"role": m["role"], "content": "".join(b["text"] for b in m["content"])}
            for m in row["messages"]
        ]
        # the same ids TRL would train on: one render, one tokenization
        assert t.input_ids == tokenizer.apply_chat_template(plain, return_dict=True)["input_ids"]
        blocks = [b for m in row["messages"] for b in m["content"]]
        for k, b in enumerate(blocks):
            toks = [i for i, owner in enumerate(t.block_of) if owner == k]
            assert tokenizer.decode([t.input_ids[i] for i in toks]).startswith(b["text"])
            assert {t.weights[i] for i in toks} == {float(b["weight"])}
        # template tokens weigh 0, but the assistant's end of turn trains like its last block
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        ends = [i for i, tid in enumerate(t.input_ids) if tid == im_end]
        assert t.weights[ends[0]] == 0 and t.block_of[ends[0]] == -1  # after the user turn
        assert t.weights[ends[1]] == blocks[-1]["weight"]
        assert all(t.weights[i] == 0 for i, o in enumerate(t.block_of) if o == -1 and i != ends[1])


def test_weights_switch_exactly_at_block_boundaries(tokenizer):
    from openweights.jobs.weighted_sft.blocks import tokenize_conversation

    messages = [
        {"role": "user", "content": "apple river"},
        {
            "role": "assistant",
            "content": [
                block("green stone", 0.5, "a"),
                block(" <response>", -1, "b"),
                block("north", 2, "c"),
                block("</response>", 0),
            ],
        },
    ]
    t = tokenize_conversation(tokenizer, messages)
    pieces = [
        (tokenizer.decode([i]), w)
        for i, w, o in zip(t.input_ids, t.weights, t.block_of, strict=True)
        if o >= 0
    ]
    text_by_weight: dict[float, str] = {}
    for piece, w in pieces:
        text_by_weight[w] = text_by_weight.get(w, "") + piece
    # user string content: weight 0 by default (responses only)
    assert text_by_weight[0.0].startswith("apple river")
    assert text_by_weight[0.5] == "green stone"
    assert text_by_weight[-1.0] == " <response>"
    assert text_by_weight[2.0] == "north"
    assert text_by_weight[0.0].endswith("</response><|im_end|>")

    # a boundary inside a word: the token that straddles it takes the first block's weight
    messages[1]["content"] = [block("gre", 1), block("en", 3)]
    t = tokenize_conversation(tokenizer, messages)
    owned = [
        (tokenizer.decode([i]), w)
        for i, w, o in zip(t.input_ids, t.weights, t.block_of, strict=True)
        if o >= 1
    ]
    assert "".join(p for p, _ in owned) == "green<|im_end|>"
    first = owned[0]
    assert first[1] == 1.0


def test_weighted_loss_ignores_zero_and_reverses_negative_weights():
    import torch

    from openweights.jobs.weighted_sft.trainer import weighted_loss

    torch.manual_seed(0)
    logits = torch.randn(1, 5, 11, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    w = torch.tensor([[0.0, 1.0, 0.0, -1.0, 2.0]])
    expected = (nll[0] * 1 - nll[2] * 1 + nll[3] * 2) / 4
    assert torch.allclose(weighted_loss(logits, ids, w), expected)
    zero = weighted_loss(logits, ids, torch.zeros(1, 5))
    zero.backward()
    assert zero.item() == 0 and logits.grad.abs().sum() == 0


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    from tests.conftest import Server, _server_env

    home = tmp_path_factory.mktemp("server-wsft")
    srv = Server(home=home, env=_server_env(request, "sqlite", home)).start()
    yield srv
    srv.stop()


def test_weighted_sft_job_trains_tracks_logprobs_per_tag_and_stores_the_model(
    server, ow, start_worker, tiny_model, tmp_path
):
    start_worker(server.url, worker_token(ow), "--any-hardware", env={"OMP_NUM_THREADS": "2"})
    train = ow.files.upload(
        str(write_jsonl(tmp_path / "weighted.jsonl", weighted_rows(16))), purpose="conversations"
    )["id"]
    logp = ow.files.upload(
        str(write_jsonl(tmp_path / "logp.jsonl", weighted_rows(4, seed=7))),
        purpose="weighted_conversations",
    )["id"]
    job = ow.weighted_sft.create(
        model=str(tiny_model),
        training_file=train,
        epochs=1,
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        r=4,
        warmup_steps=0,
        max_seq_length=128,
        eval_every_n_steps=2,
        logp_callback_datasets={"in-distribution": logp},
        merge_before_push=False,
    )
    assert job.id.startswith("sftjob-")
    vp = job.params["validated_params"]
    assert (
        vp["loss"] == "sft" and vp["optim"] == "adamw_torch" and vp["output_dir"] == "uploads/model"
    )
    job.wait(timeout=600)
    assert job.status == "completed", job.error
    events = [e["data"] for e in ow.events.list(job_id=job.id)]
    progress = [e for e in events if e.get("type") == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    logps = [e for e in events if e.get("type") == "logp"]
    assert {e["step"] for e in logps} == {0, 2, 4}
    assert {e["tag"] for e in logps} == {
        "in-distribution",
        "in-distribution/minimize",
        "in-distribution/maximize",
    }
    assert all(e["logp"] < 0 and isinstance(e["row"], int) for e in logps)
    assert len([e for e in logps if e["step"] == 0 and e["tag"] == "in-distribution"]) == 4
    model_event = next(e for e in events if e.get("type") == "model")
    assert model_event["kind"] == "adapter"
    out = tmp_path / "out"
    job.download(str(out))
    assert (out / "uploads" / "model" / "adapter_model.safetensors").exists()
    import json

    scored = [
        json.loads(line)
        for line in (out / "uploads" / "logp" / "in-distribution" / "step-4.jsonl")
        .read_text()
        .splitlines()
    ]
    assert len(scored) == 4
    blk = scored[0]["messages"][1]["content"][1]
    assert blk["tag"] == "maximize" and blk["logprob"] < 0 and blk["n_tokens"] > 0
    assert scored[0]["logprobs"]["tags"]["maximize"]["n_tokens"] == blk["n_tokens"]


def test_non_numeric_weight_is_refused_at_upload_with_line_and_field(server, ow, tmp_path):
    from openweights import OpenWeightsError

    rows = weighted_rows(3)
    rows[2]["messages"][1]["content"][0]["weight"] = "heavy"
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(OpenWeightsError, match=r"line 3.*messages\[1\]\.content\[0\]\.weight"):
        ow.files.upload(str(path), purpose="conversations")


def test_rows_with_nothing_to_train_on_are_refused_at_create(server, ow, tiny_model, tmp_path):
    from openweights import OpenWeightsError

    rows = weighted_rows(3)
    for b in rows[1]["messages"][1]["content"]:
        b["weight"] = 0
    fid = ow.files.upload(str(write_jsonl(tmp_path / "zero.jsonl", rows)), purpose="conversations")[
        "id"
    ]
    with pytest.raises(
        OpenWeightsError, match=r"zero.jsonl .*line 2, field messages: nothing to train on"
    ):
        ow.weighted_sft.create(model=str(tiny_model), training_file=fid)
