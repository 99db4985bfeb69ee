"""`ow.logprob`: a job that scores a dataset's per-token, per-block and per-tag log-probabilities."""

from __future__ import annotations

import json
import math

import pytest

from openweights.testing import conversations_rows, make_tiny_model, weighted_rows, write_jsonl
from tests.test_e2e import worker_token

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    from tests.conftest import Server, _server_env

    home = tmp_path_factory.mktemp("server-lp")
    srv = Server(home=home, env=_server_env(request, "sqlite", home)).start()
    yield srv
    srv.stop()


def _reference_logps(model_dir, messages):
    """log p(token | prefix) for each token after the first, computed directly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    plain = [
        {
            "role": m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else "".join(b["text"] for b in m["content"]),
        }
        for m in messages
    ]
    ids = tok.apply_chat_template(plain, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    return ids[0].tolist(), logp.gather(-1, ids[0, 1:, None])[:, 0].tolist()


def test_logprob_job_scores_tokens_blocks_and_tags(server, ow, start_worker, tiny_model, tmp_path):
    start_worker(server.url, worker_token(ow), "--any-hardware", env={"OMP_NUM_THREADS": "2"})
    rows = weighted_rows(3) + conversations_rows(2)
    fid = ow.files.upload(str(write_jsonl(tmp_path / "d.jsonl", rows)), purpose="conversations")[
        "id"
    ]
    job = ow.logprob.create(model=str(tiny_model), dataset=fid, batch_size=2)
    assert job.id.startswith("lpjob-")
    job.wait(timeout=300)
    assert job.status == "completed", job.error
    scored = [
        json.loads(line) for line in ow.files.content(job.outputs["file"]).decode().splitlines()
    ]
    assert len(scored) == 5

    # tokens and their log-probabilities are exactly those of the model (batching, padding)
    for row, out in zip(rows, scored, strict=True):
        ids, ref = _reference_logps(tiny_model, row["messages"])
        tokens = out["logprobs"]["tokens"]
        assert [t["token_id"] for t in tokens] == ids
        assert tokens[0]["logp"] is None
        assert all(
            math.isclose(t["logp"], r, abs_tol=1e-4) for t, r in zip(tokens[1:], ref, strict=True)
        )

    # a block's logprob is the sum over its tokens; a tag's mean over its blocks' tokens
    first = scored[0]
    tokens = first["logprobs"]["tokens"]
    for j, blk in enumerate(first["messages"][1]["content"]):
        mine = [t["logp"] for t in tokens if t["block"] == [1, j]]
        assert blk["n_tokens"] == len(mine) and math.isclose(
            blk["logprob"], sum(mine), rel_tol=1e-6
        )
    maximize = first["messages"][1]["content"][1]
    assert first["logprobs"]["tags"]["maximize"]["sum"] == pytest.approx(maximize["logprob"])
    # plain rows: the row mean is over the assistant turn (content and end of turn)
    plain = scored[3]
    asst = [t["logp"] for t in plain["logprobs"]["tokens"] if t["block"] and t["block"][0] == 1]
    assert plain["logprobs"]["mean"] == pytest.approx(sum(asst) / len(asst))

    events = [e["data"] for e in ow.events.list(job_id=job.id)]
    per_row = [e for e in events if e.get("type") == "logp" and e["tag"] == ""]
    assert [e["row"] for e in per_row] == [0, 1, 2, 3, 4]
    assert per_row[0]["logp"] == pytest.approx(first["logprobs"]["mean"])
    means = {e["tag"]: e["logp_mean"] for e in events if e.get("type") == "logp_mean"}
    assert set(means) == {"", "minimize", "maximize"}
