"""`ow.inference.create(model="openai/<name>")`: the rows go to an OpenAI Batch API.

OpenAI is unreachable here, so the "OpenAI" is a second organization on a real openweights server,
whose `/v1/files` + `/v1/batches` speak OpenAI's Batch API to the official `openai` client; its
batch runs as a real inference job of the tiny model on that organization's own worker. The user's
job runs on the user's worker and reaches it only through the org secrets `OPENAI_BASE_URL` and
`OPENAI_API_KEY`, as it would reach api.openai.com.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from openweights.testing import conversations_rows, make_tiny_model, write_jsonl
from tests.conftest import base_env
from tests.test_e2e import worker_token

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    from tests.conftest import Server, _server_env

    home = tmp_path_factory.mktemp("server-oai")
    srv = Server(home=home, env=_server_env(request, "sqlite", home)).start()
    yield srv
    srv.stop()


def _client(server, org: str):
    from openweights import OpenWeights

    return OpenWeights(base_url=server.url, api_key=server.signup(org))


@pytest.fixture(scope="module")
def orgs(server, tmp_path_factory):
    """(user, provider): one worker each; the provider's runs the tiny model."""
    user, provider = _client(server, "user"), _client(server, "provider")
    procs = []
    for name, ow in (("user", user), ("provider", provider)):
        tmp = tmp_path_factory.mktemp(f"w-{name}")
        env = base_env(tmp / "home")
        env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "openweights.worker",
                    "--url",
                    server.url,
                    "--token",
                    worker_token(ow),
                    "--name",
                    name,
                    "--any-hardware",
                ],
                env=env,
                stdout=open(tmp / "worker.log", "ab"),
                stderr=subprocess.STDOUT,
                cwd=tmp,
                start_new_session=True,
            )  # fmt: skip
        )
    user.secrets.set("OPENAI_BASE_URL", f"{server.url}/v1")
    user.secrets.set("OPENAI_API_KEY", provider.api_key)
    yield user, provider
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    user.close()
    provider.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-oai") / "model")


def upload(ow, tmp_path, rows):
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    return ow.files.upload(str(path), purpose="conversations").id


def test_openai_model_runs_on_the_batch_api_and_comes_back_as_result_rows(
    orgs, tiny_model, tmp_path
):
    user, provider = orgs
    rows = [{"messages": r["messages"][:1], "tag": i} for i, r in enumerate(conversations_rows(3))]
    job = user.inference.create(
        model=f"openai/{tiny_model}",
        input_file_id=upload(user, tmp_path, rows),
        max_tokens=5,
        temperature=0,
        n_completions_per_prompt=2,
        logprobs=1,
    )
    assert job.requires_vram_gb == 0  # no GPU: it only talks to the API
    job.wait(timeout=300)
    log = user.files.content(job.runs[-1].log_file).decode(errors="replace")
    assert job.status == "completed", log[-3000:]
    out = [
        json.loads(line) for line in user.files.content(job.outputs["file"]).decode().splitlines()
    ]
    assert [r["tag"] for r in out] == [0, 1, 2]  # every input row, in order, with its fields
    for r in out:
        assert len(r["completion"]) == 2 and all(isinstance(c, str) and c for c in r["completion"])
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
        assert len(r["logprobs"]) == 2 and r["logprobs"][0][0]["top_logprobs"]
    events = [e["data"] for e in user.events.list(job_id=job.id)]
    batch = next(e for e in events if e.get("type") == "openai_batch")
    assert batch["indices"] == [0, 1, 2]
    # the batch really ran on the provider's side, as its own inference job
    provider_jobs = provider.jobs.list()
    assert any(j.type == "inference" and j.status == "completed" for j in provider_jobs)
    assert not any(j.type == "inference" for j in user.jobs.list() if j.id != job.id)


def test_openai_model_refuses_what_the_api_cannot_do_and_a_missing_key_is_named(
    orgs, server, tiny_model, tmp_path
):
    from openweights import OpenWeights
    from openweights.client._errors import InvalidParamsError

    user, _ = orgs
    fid = upload(user, tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}])
    for bad, field in [({"prefill": "Sure"}, "prefill"), ({"min_tokens": 5}, "min_tokens")]:
        with pytest.raises(InvalidParamsError, match=field):
            user.inference.create(model="openai/gpt-4o-mini", input_file_id=fid, **bad)
    other = OpenWeights(base_url=server.url, api_key=server.signup("no-openai-key"))
    try:
        tmp = tmp_path / "w"
        env = base_env(tmp / "home")
        proc = subprocess.Popen(
            [sys.executable, "-m", "openweights.worker", "--url", server.url, "--token",
             worker_token(other), "--name", "nokey", "--any-hardware"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
        fid2 = upload(other, tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}])
        job = other.inference.create(model="openai/gpt-4o-mini", input_file_id=fid2, max_attempts=1)
        job.wait(timeout=120)
        assert job.status == "failed"
        log = other.files.content(job.runs[-1].log_file).decode(errors="replace")
        assert "OPENAI_API_KEY" in log and "ow env set" in log
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        other.close()


class _Batches:
    """The two Batch API calls `OpenAIBatch` resumes with (unit level: no server)."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.created = 0
        self.retrieved: list[str] = []

    def create(self, **kw):
        self.created += 1
        return _Obj(id=f"batch_{self.created}", status="validating", output_file_id=None,
                    error_file_id=None, request_counts=None)  # fmt: skip

    def retrieve(self, batch_id):
        self.retrieved.append(batch_id)
        status = self.statuses.pop(0) if self.statuses else "completed"
        return _Obj(id=batch_id, status=status, output_file_id="out", error_file_id="err",
                    request_counts=None, errors=None)  # fmt: skip


class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Files:
    def __init__(self, lines):
        self.lines = lines

    def create(self, **kw):
        return _Obj(id="file-in")

    def content(self, file_id):
        rows = self.lines.get(file_id, [])
        return _Obj(text="".join(json.dumps(r) + "\n" for r in rows))


def _answer(i, text):
    body = {"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}}  # fmt: skip
    return {"custom_id": str(i), "response": {"status_code": 200, "body": body}, "error": None}


def test_a_retry_waits_on_the_batch_an_earlier_run_submitted_and_failed_rows_are_named():
    from openweights.jobs.inference.openai_batch import OpenAIBatch
    from openweights.jobs.inference.params import InferenceConfig

    cfg = InferenceConfig(model="openai/gpt-4o-mini", input_file_id="conversations:file-x")
    rows = [(i, (i + 1, {"messages": [{"role": "user", "content": str(i)}]})) for i in range(3)]
    files = _Files(
        {"out": [_answer(0, "a"), _answer(2, "c")],
         "err": [{"custom_id": "1", "response": None, "error": {"message": "rate limited"}}]}
    )  # fmt: skip
    client = _Obj(batches=_Batches(["in_progress", "completed"]), files=files)
    logged: list[dict] = []
    earlier = [{"type": "openai_batch", "batch_id": "batch_old", "indices": [0, 1, 2]}]
    batch = OpenAIBatch(cfg, log=logged.append, client=client, sleep=lambda s: None)
    done = batch.run(rows, earlier)
    assert client.batches.created == 0 and set(client.batches.retrieved) == {"batch_old"}
    assert logged == []  # nothing new submitted, nothing paid twice
    assert {i: d["completion"] for i, d in done.items()} == {0: "a", 2: "c"}
    assert batch.failed == ["row 1: rate limited"]
    # another set of rows (the retry of the failed one) is a new batch, recorded before waiting
    again = OpenAIBatch(cfg, log=logged.append, client=client, sleep=lambda s: None)
    again.run(rows[1:2], earlier)
    assert client.batches.created == 1 and logged[0]["indices"] == [1]
