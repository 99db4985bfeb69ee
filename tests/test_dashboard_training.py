"""A real (tiny) fine-tune watched in a real browser: the loss curve grows on the page while it
trains, log-probabilities get one line per dataset and tag, sampled completions per step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from openweights.testing import conversations_rows, make_tiny_model, write_jsonl
from tests.conftest import base_env
from tests.test_dashboard import check_page, launch_chromium, login, serve_sqlite
from tests.test_e2e import worker_token

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    yield from serve_sqlite(tmp_path_factory, request)


@pytest.fixture(scope="module")
def browser():
    yield from launch_chromium()


def test_fine_tune_loss_curve_logprobs_and_samples_grow_on_the_page(
    server, browser, ow, api_key, start_worker, tmp_path
):
    """A real tiny fine-tune: the plots page, opened while the job is pending, draws the loss
    curve as the steps come in; log-probabilities get one line per dataset and tag; the
    sampling callback's completions show per step."""
    model = make_tiny_model(tmp_path / "tiny")
    train = ow.files.upload(
        str(write_jsonl(tmp_path / "train.jsonl", conversations_rows(24))), purpose="conversations"
    )["id"]
    probe = ow.files.upload(
        str(write_jsonl(tmp_path / "probe.jsonl", conversations_rows(3, seed=5))),
        purpose="conversations",
    )["id"]
    steps = 6
    job = ow.fine_tuning.create(
        model=str(model),
        training_file=train,
        loss="sft",
        epochs=1,
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        r=4,
        lora_alpha=8,
        warmup_steps=0,
        max_seq_length=128,
        save_steps=3,
        merge_before_push=False,
        eval_every_n_steps=3,
        logp_callback_datasets={"probe": probe},
        sampling_callbacks=[{"dataset": probe, "eval_steps": 3, "max_tokens": 4}],
    )
    page = login(browser, server, api_key, f"/dashboard/jobs/{job.id}/plots")
    page.wait_for_selector('#plots[data-ready="1"]', state="attached")
    assert page.locator("figure.plot").count() == 0  # pending: nothing yet
    # record every size the loss curve is drawn at (reading it after a wait would race with
    # the next batch of points)
    page.evaluate(
        """() => { window.seen = [];
          new MutationObserver(() => {
            const f = document.querySelector('figure[data-metric="loss"]');
            if (f && window.seen[window.seen.length - 1] !== f.dataset.points)
              window.seen.push(f.dataset.points);
          }).observe(document.querySelector('#plots'),
                     {subtree: true, childList: true, attributes: true});
        }"""
    )

    start_worker(server.url, worker_token(ow), "--any-hardware", env={"OMP_NUM_THREADS": "2"})
    page.wait_for_selector(f'figure[data-metric="loss"][data-points="{steps}"]', timeout=300_000)
    seen = [int(n) for n in page.evaluate("window.seen")]
    assert seen[0] < steps and seen == sorted(seen), f"drawn at {seen}: not while training"
    page.wait_for_function(
        "document.querySelector('#plot-state').textContent.includes('job')", timeout=300_000
    )
    job = job.wait(timeout=300)
    assert job.status == "completed", ow.files.content(job.runs[-1].log_file).decode()[-2000:]
    page.reload()
    page.wait_for_selector('#plots[data-ready="1"]', state="attached")
    series = json.loads(page.get_attribute('figure[data-metric="logp_mean"]', "data-series"))
    assert series and all(s.startswith("logp_mean [dataset=probe, tag=probe") for s in series)
    assert len(series) == len(set(series))
    assert page.locator('figure[data-metric="learning_rate"]').count() == 1

    # "copy as Python" of a fine-tune resubmits the same job (same content hash, same id)
    page.goto(f"{server.url}/dashboard/jobs/{job.id}")
    snippet = page.inner_text("#snippet")
    assert "ow.fine_tuning.create(" in snippet
    env = base_env(tmp_path / "snippet-home")
    env.update(OPENWEIGHTS_URL=server.url, OPENWEIGHTS_API_KEY=api_key)
    out = subprocess.run(
        [sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [job.id, "completed"]

    page.goto(f"{server.url}/dashboard/models")
    row = page.locator("#models tbody tr", has_text=job.id)
    assert row.count() == 1 and str(model) in row.inner_text()  # base model, source job
    assert "checkpoint-3" in row.inner_text() and f"checkpoint-{steps}" in row.inner_text()

    page.goto(f"{server.url}/dashboard/jobs/{job.id}/heatmap?dataset=probe&row=1")
    steps_shown = [
        int(x)
        for x in page.locator("#heatmap tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.step)"
        )
    ]
    assert steps_shown[0] == 0 and steps_shown[-1] == steps, steps_shown
    assert page.locator("#heatmap tbody tr >> nth=0 >> .tok[title]").count() > 0

    page.goto(f"{server.url}/dashboard/jobs/{job.id}/samples")
    heads = page.locator("#samples thead th").all_inner_texts()
    assert any(f"step {steps}" in h for h in heads)
    assert page.locator("#samples tbody tr").count() == 3

    # every page of a real fine-tune at desktop and laptop widths: labelled controls, no
    # sideways scroll
    for width, height in ((1920, 1080), (1280, 720)):
        page.set_viewport_size({"width": width, "height": height})
        for tab in ("", "/logs", "/events", "/plots", "/samples", "/heatmap"):
            page.goto(f"{server.url}/dashboard/jobs/{job.id}{tab}")
            if tab == "/plots":
                page.wait_for_selector('#plots[data-ready="1"]', state="attached")
            check_page(page, "job" + tab.replace("/", "-"))
        for fid, name in ((train, "file-chat"), (probe, "file-probe")):
            page.goto(f"{server.url}/dashboard/files/{fid}")
            check_page(page, name)
        page.goto(f"{server.url}/dashboard/models")
        check_page(page, "models")
    page.context.close()
