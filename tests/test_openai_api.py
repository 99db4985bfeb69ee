"""The OpenAI wire API of the server: a real deployment (`transformers serve` on the tiny model, in
a job on a real worker) answering the official `openai` client and `ow.chat` through `/v1`."""

from __future__ import annotations

import httpx
import pytest

from openweights.testing import make_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")
openai = pytest.importorskip("openai", reason="the openai client is in the test extra")

MSG = [{"role": "user", "content": "apple river"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    """SQLite only: routing reads the same store functions on either back end."""
    from tests.conftest import Server, _server_env

    home = tmp_path_factory.mktemp("server-openai")
    srv = Server(home=home, env=_server_env(request, "sqlite", home)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def org(server):
    from openweights import OpenWeights

    client = OpenWeights(base_url=server.url, api_key=server.signup())
    yield client
    client.chat.close()
    client.close()


# the same module-scoped worker as the deployment tests (SIGTERM first at teardown)
from tests.test_deploy import stop_worker, worker  # noqa: E402, F401, F811

IDLE_S = 10


@pytest.fixture(scope="module")
def api(org, worker, tiny):  # noqa: F811 (pytest fixture by name)
    """`ow.chat` deploys the model on first use; the tests hold it (keep-alive) until the last."""
    org.chat.deploy_kwargs = {"idle_timeout_s": IDLE_S}
    c = org.chat.completions.create(model=tiny, messages=MSG, max_tokens=2)
    assert c.model == tiny
    api = org.chat.deployments[tiny]
    api._start_keepalive()  # what `up()` does: the deployment stays while held
    yield api
    api.down()


def test_official_openai_client_chats_through_the_server(api, tiny):
    assert api.base_url.endswith("/v1") and api.api_key.startswith("ow_")
    assert tiny in api.models
    client = openai.OpenAI(base_url=api.base_url, api_key=api.api_key)
    c = client.chat.completions.create(model=tiny, messages=MSG, max_tokens=4)
    assert c.model == tiny and c.choices[0].finish_reason in ("length", "stop")
    assert c.usage.completion_tokens >= 1
    chunks = list(
        client.chat.completions.create(model=tiny, messages=MSG, max_tokens=4, stream=True)
    )
    assert len(chunks) >= 2 and all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    t = client.completions.create(model=tiny, prompt="apple", max_tokens=3)
    assert t.object == "text_completion" and t.choices[0].text is not None
    streamed = list(
        client.completions.create(model=tiny, prompt="apple", max_tokens=3, stream=True)
    )
    assert streamed
    listed = {m.id: m for m in client.models.list()}  # deployed, though not a registered model
    assert listed[tiny].object == "model" and listed[tiny].model_extra["deployed"] is True


def test_ow_chat_completions_plain_and_streamed(org, api, tiny):
    c = org.chat.completions.create(model=tiny, messages=MSG, max_tokens=3)
    assert c.choices[0].message.role == "assistant" and c.usage.completion_tokens >= 1
    chunks = list(org.chat.completions.create(model=tiny, messages=MSG, max_tokens=3, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert list(org.chat.deployments) == [tiny]  # deployed once, by the fixture


def test_unknown_model_gets_404_naming_it(api):
    client = openai.OpenAI(base_url=api.base_url, api_key=api.api_key, max_retries=0)
    with pytest.raises(openai.NotFoundError, match="no-such/model"):
        client.chat.completions.create(model="no-such/model", messages=MSG)


def test_no_key_and_other_orgs_are_refused(server, api, tiny):
    r = httpx.post(f"{api.base_url}/chat/completions", json={"model": tiny, "messages": MSG})
    assert r.status_code == 401
    other = openai.OpenAI(base_url=api.base_url, api_key=server.signup(), max_retries=0)
    with pytest.raises(openai.NotFoundError, match="in your organization"):
        other.chat.completions.create(model=tiny, messages=MSG, max_tokens=2)


def test_deployment_itself_needs_its_key(org, api):
    info = next(
        e["data"]
        for e in org.events.list(job_id=api.job_id)
        if e["data"].get("type") == "deployment"
    )
    url = info["base_url"]
    body = {"model": api.model, "messages": MSG, "max_tokens": 2}
    assert httpx.post(f"{url}/chat/completions", json=body).status_code == 401
    bad = {"Authorization": f"Bearer {api.api_key}"}  # the org key is not the deployment's key
    assert httpx.post(f"{url}/chat/completions", json=body, headers=bad).status_code == 401
    good = {"Authorization": f"Bearer {info['api_key']}"}
    assert httpx.post(f"{url}/chat/completions", json=body, headers=good).status_code == 200


def test_openai_model_names_go_to_openai_with_the_official_client(org, api, tiny, monkeypatch):
    """`gpt-*`, `o3`, `openai/<name>` skip deployments, as in the original: here "OpenAI" is this
    server's own /v1 (OPENAI_BASE_URL), which answers with the deployed tiny model."""
    from openweights.client.chat import is_openai_model

    assert all(map(is_openai_model, ["gpt-4o-mini", "o3", "o1-mini", "openai/x", "chatgpt-4o"]))
    assert not any(map(is_openai_model, ["unsloth/Qwen3-4B", "o", "org/gpt-4", "ollama/o3x"]))
    monkeypatch.setenv("OPENAI_BASE_URL", api.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", org.api_key)
    org.chat._openai = None
    try:
        c = org.chat.completions.create(model=f"openai/{tiny}", messages=MSG, max_tokens=3)
        assert isinstance(c, openai.types.chat.ChatCompletion) and c.model == tiny
        assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens
        chunks = list(
            org.chat.completions.create(
                model=f"openai/{tiny}", messages=MSG, max_tokens=3, stream=True
            )
        )
        assert chunks and all(
            isinstance(ch, openai.types.chat.ChatCompletionChunk) for ch in chunks
        )
        assert {ch.model for ch in chunks} == {tiny}
        assert list(org.chat.deployments) == [tiny]  # no deployment was made for it
    finally:
        org.chat._openai = None


def test_released_deployment_stops_when_idle_and_then_404s(org, api, tiny):
    job_id = api.job_id
    api._stop.set()  # release it: no keep-alive, no requests
    job = org.jobs.wait(job_id, timeout_s=120)
    assert job.status == "completed", job.error
    events = [e["data"] for e in org.events.list(job_id=job_id)]
    assert any(d.get("type") == "deployment_stopped" and d["reason"] == "idle" for d in events)
    with pytest.raises(Exception, match="No running deployment serves model"):
        org.chat.completions.create(model=tiny, messages=MSG, deploy=False)
