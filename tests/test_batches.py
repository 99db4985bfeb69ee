"""The OpenAI Batch API, driven by the official `openai` client, runs as inference jobs on a real worker."""

from __future__ import annotations

import json

import pytest

from openweights.testing import conversations_rows
from tests.conftest import wait_until
from tests.test_inference import mow, server, tiny_model, worker  # noqa: F401 (module fixtures)

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.filterwarnings("ignore")
TERMINAL = ("completed", "failed", "cancelled", "expired")


@pytest.fixture
def client(server, mow):  # noqa: F811
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=mow.api_key, max_retries=0)
    yield c
    c.close()


def request(cid: str, model: str, question: str, **body) -> dict:
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": question}], **body},
    }


def upload(client, tmp_path, lines: list[dict], name: str = "batch.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="batch")


def test_openai_client_runs_a_chat_batch_end_to_end(client, mow, worker, tiny_model, tmp_path):  # noqa: F811
    model = str(tiny_model)
    questions = [r["messages"][0]["content"] for r in conversations_rows(5, seed=4)]
    lines = (
        [
            request(f"q-{i}", model, q, max_tokens=5, min_tokens=5, temperature=0)
            for i, q in enumerate(questions[:3])
        ]
        + [  # other parameters: a second inference job
            request(
                f"q-{i}",
                model,
                q,
                max_completion_tokens=3,
                min_tokens=3,
                logprobs=True,
                top_logprobs=2,
            )
            for i, q in enumerate(questions[3:], start=3)
        ]
    )
    lines.insert(1, lines.pop())  # interleaved: the output still follows the input order
    f = upload(client, tmp_path, lines)
    assert f.purpose == "batch" and f.bytes > 0
    batch = client.batches.create(
        input_file_id=f.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"experiment": "tiny"},
    )
    assert batch.id.startswith("batch_") and batch.status in ("validating", "in_progress")
    assert batch.request_counts.total == 5 and batch.metadata == {"experiment": "tiny"}
    done = wait_until(
        lambda: (b := client.batches.retrieve(batch.id)).status in TERMINAL and b,
        300,
        "the batch to finish",
        interval_s=0.5,
    )
    assert done.status == "completed", done
    assert done.request_counts.completed == 5 and done.request_counts.failed == 0
    assert done.error_file_id is None and done.completed_at >= done.created_at
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [x["custom_id"] for x in lines]
    for o, x in zip(out, lines, strict=True):
        assert o["error"] is None and o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == model
        choice = body["choices"][0]
        assert (
            isinstance(choice["message"]["content"], str)
            and choice["message"]["role"] == "assistant"
        )
        want = x["body"].get("max_tokens") or x["body"]["max_completion_tokens"]
        assert body["usage"]["completion_tokens"] == want and choice["finish_reason"] == "length"
        if x["body"].get("logprobs"):
            content = choice["logprobs"]["content"]
            assert len(content) == want and len(content[0]["top_logprobs"]) == 2
        else:
            assert choice["logprobs"] is None
    # the official client parses what it reads back, and the batch is listed
    again = client.batches.retrieve(batch.id)
    assert again.output_file_id == done.output_file_id  # same content, same file
    assert batch.id in [b.id for b in client.batches.list().data]
    assert len({j for j in done.model_extra.get("job_ids", [])}) == 2


def test_bad_batch_input_is_refused_naming_line_and_field(client, tiny_model, tmp_path):  # noqa: F811
    good = request("a", str(tiny_model), "hi")
    bad = {**request("b", str(tiny_model), "hi")}
    del bad["custom_id"]
    f = upload(client, tmp_path, [good, bad])
    with pytest.raises(openai.BadRequestError, match="line 2: custom_id"):
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    tools = request("c", str(tiny_model), "hi", tools=[])
    f = upload(client, tmp_path, [tools], name="tools.jsonl")
    with pytest.raises(openai.BadRequestError, match="line 1: body.tools"):
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    wrong_endpoint = request("d", str(tiny_model), "hi")
    f = upload(client, tmp_path, [wrong_endpoint], name="endpoint.jsonl")
    with pytest.raises(openai.BadRequestError, match="line 1: url"):
        client.batches.create(
            input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_000000000000")


def test_cancelled_batch_stops_its_jobs(client, mow, worker, tiny_model, tmp_path):  # noqa: F811
    lines = [
        request(f"long-{i}", str(tiny_model), f"question {i}", max_tokens=400, min_tokens=400)
        for i in range(16)
    ]
    f = upload(client, tmp_path, lines, name="long.jsonl")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_until(
        lambda: (b := client.batches.retrieve(batch.id)).status in TERMINAL and b,
        120,
        "the cancel",
        interval_s=0.5,
    )
    assert done.status == "cancelled" and done.cancelled_at is not None
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"} and len(errors) == 16


def test_completions_requests_map_to_text_rows_and_text_completion_lines():
    """`/v1/completions` batches: prompt → a `text` row; the result → OpenAI's text_completion."""
    from openweights.server.routes.batches import _requests, _response_line, _row, _sampling

    line = {
        "custom_id": "t1",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "m", "prompt": "Once", "max_tokens": 2, "logprobs": 1, "stop": "."},
    }
    data = (json.dumps(line) + "\n").encode()
    [(n, cid, body)] = _requests("batch:file-x", data, "/v1/completions")
    assert (n, cid) == (1, "t1")
    assert _sampling(body, "/v1/completions") == {"max_tokens": 2, "logprobs": 1, "stop": ["."]}
    assert _row(body, cid) == {"text": "Once", "custom_id": "t1"}
    job = {
        "id": "inferencejobs-abc",
        "finished_at": 5.0,
        "params": {"validated_params": {"model": "m"}},
    }
    lp = [{"token": " up", "logprob": -0.5, "top_logprobs": [{"token": " up", "logprob": -0.5}]}]
    row = {
        "text": "Once",
        "custom_id": "t1",
        "completion": " up",
        "finish_reason": "length",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "logprobs": lp,
    }
    out = _response_line("batch_x", "/v1/completions", job, row)
    body = out["response"]["body"]
    assert out["custom_id"] == "t1" and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " up"
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [-0.5]
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
