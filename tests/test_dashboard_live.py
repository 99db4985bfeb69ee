"""The dashboard following real jobs live in a real browser: log stream, growing plots,
events, samples, compare."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, base_env, wait_until
from tests.test_dashboard import check_page, launch_chromium, login, serve_sqlite
from tests.test_e2e import worker_token

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    yield from serve_sqlite(tmp_path_factory, request)


@pytest.fixture(scope="module")
def browser():
    yield from launch_chromium()


def job_script(tmp_path: Path) -> Path:
    """A job that logs, records metrics, waits for a go-file, then logs more and two sample files."""
    path = tmp_path / "dash_job.py"
    path.write_text(
        textwrap.dedent(
            """
            import json, os, sys, time
            from openweights import OpenWeights
            ow = OpenWeights()
            go = sys.argv[1]
            print("\\n".join(f"filler line {i}" for i in range(300)), flush=True)  # overflows
            print("first line of the job", flush=True)
            ow.run.log({"type": "progress", "step": 1, "loss": 2.0, "learning_rate": 0.01})
            ow.run.log({"type": "logprobs", "step": 1, "dataset": "held-out", "tag": "a", "logp": -3.0})
            ow.run.log({"type": "logprobs", "step": 1, "dataset": "held-out", "tag": "b", "logp": -1.0})
            while not os.path.exists(go):  # the test says when to go on
                time.sleep(0.05)
            print("second line after go", flush=True)
            for step in (2, 3):
                ow.run.log({"type": "progress", "step": step, "loss": 2.0 / step, "learning_rate": 0.01})
                ow.run.log({"type": "logprobs", "step": step, "dataset": "held-out", "tag": "a", "logp": -3.0 / step})
                ow.run.log({"type": "logprobs", "step": step, "dataset": "held-out", "tag": "b", "logp": -1.0 / step})
            for step in (10, 20):
                rows = [{"messages": [{"role": "user", "content": f"prompt {i}"}],
                         "completion": f"answer {i} at step {step}"} for i in range(3)]
                with open(f"samples-{step}.jsonl", "w") as f:
                    f.write("\\n".join(json.dumps(r) for r in rows) + "\\n")
                ow.run.log({"tag": "samples", "step": step}, file=f"samples-{step}.jsonl")
            print("job done", flush=True)
            """
        )
    )
    return path


# -- one job, live -------------------------------------------------------------------------


def test_job_pages_follow_a_running_job_live(server, browser, ow, api_key, start_worker, tmp_path):
    go = tmp_path / "go"
    script = job_script(tmp_path)
    job = ow.jobs.create(
        type="dash", script=f"{sys.executable} {script} {go}", params={"lr": 0.5, "note": "live"}
    )
    page = login(browser, server, api_key, f"/dashboard/jobs/{job.id}")
    assert "No worker is running" in page.inner_text("#pending-reason")

    start_worker(server.url, worker_token(ow), name="dash-worker")
    wait_until(lambda: ow.jobs.retrieve(job.id).status == "in_progress", 60, "job start")
    page.goto(f"{server.url}/dashboard/jobs/{job.id}/logs")
    page.wait_for_function(
        "document.querySelector('#log').textContent.includes('first line of the job')"
    )
    plots = page.context.new_page()
    plots.goto(f"{server.url}/dashboard/jobs/{job.id}/plots")
    plots.wait_for_selector('figure[data-metric="loss"][data-points="1"]')
    series = json.loads(plots.get_attribute('figure[data-metric="logp"]', "data-series"))
    assert series == ["logp [dataset=held-out, tag=a]", "logp [dataset=held-out, tag=b]"]
    workers = page.context.new_page()
    workers.goto(f"{server.url}/dashboard/workers")
    row = workers.locator("#workers tbody tr", has_text="dash-worker")
    assert job.id in row.inner_text() and "active" in row.inner_text()
    worker_id = row.get_attribute("data-worker")
    row.get_by_role("link", name="dash-worker").click()  # the worker: its runs and their logs
    workers.wait_for_url(f"**/dashboard/workers/{worker_id}")
    assert job.id in workers.inner_text("#worker-current")
    assert "cpu" in workers.inner_text("#worker-facts")
    workers.locator("#worker-current").get_by_role("link", name="live log").click()
    workers.wait_for_function(
        "document.querySelector('#log').textContent.includes('first line of the job')"
    )
    workers.close()

    # Follow: the newest line stays in view; scrolling up stops following (as in a terminal),
    # new lines then leave the view where it is; ticking Follow again jumps to the end.
    at_end = (
        "(() => { const p = document.querySelector('#log'); return p.scrollHeight > "
        "p.clientHeight && p.scrollHeight - p.scrollTop - p.clientHeight < 8; })()"
    )
    page.bring_to_front()  # a background tab gets no scroll events
    assert page.is_checked("#log-follow") and page.evaluate(at_end)
    page.hover("#log")
    page.mouse.wheel(0, -100_000)  # the reader scrolls up, with the wheel
    page.wait_for_function("!document.querySelector('#log-follow').checked")

    go.write_text("go")  # the job goes on: the open pages update without a reload
    page.wait_for_function(
        "document.querySelector('#log').textContent.includes('second line after go')"
    )
    assert page.evaluate("document.querySelector('#log').scrollTop") == 0
    page.check("#log-follow")
    assert page.evaluate(at_end)
    plots.wait_for_selector('figure[data-metric="loss"][data-points="3"]')
    plots.wait_for_selector('figure[data-metric="logp"][data-points="6"]')
    page.wait_for_selector("#log[data-ended=completed]")
    plots.wait_for_function(
        "document.querySelector('#plot-state').textContent.includes('completed')"
    )
    plots.check("#logscale")
    assert "linear" in plots.inner_text('figure[data-metric="logp"] figcaption')  # negative values
    plots.eval_on_selector(
        "#smoothing", "el => { el.value = '0.5'; el.dispatchEvent(new Event('input')); }"
    )
    assert plots.inner_text("#smoothing-value") == "0.5"
    assert "smooth=0.5" in plots.url and "log=1" in plots.url  # a link keeps the view
    plots.reload()
    plots.wait_for_selector('#plots[data-ready="1"]', state="attached")
    assert plots.is_checked("#logscale") and plots.input_value("#smoothing") == "0.5"
    assert plots.locator("figure.plot").count() == 3  # learning_rate, logp, loss

    page.fill("#log-search", "second")
    assert page.inner_text("#log").strip() == "second line after go"
    assert page.inner_text("#log-matches") == "1 matching line(s)"
    with page.expect_download() as dl:
        page.click("text=Download")
    assert "second line after go" in Path(dl.value.path()).read_text()

    # events: type filter and raw JSON
    page.goto(f"{server.url}/dashboard/jobs/{job.id}/events")
    page.select_option("#event-filters select[name=type]", "logprobs")
    page.wait_for_url("**type=logprobs*")
    assert page.locator("#events tbody tr").count() == 6
    page.locator("#events tbody tr").first.locator("summary").click()
    raw = json.loads(page.locator("#events tbody tr").first.locator("pre").inner_text())
    assert raw == {"type": "logprobs", "step": 1, "dataset": "held-out", "tag": "a", "logp": -3.0}

    # samples: latest step, slider, compare two steps
    page.goto(f"{server.url}/dashboard/jobs/{job.id}/samples")
    assert "answer 0 at step 20" in page.inner_text("#samples")
    page.eval_on_selector(
        "#step-slider", "el => { el.value = '0'; el.dispatchEvent(new Event('change')); }"
    )
    page.wait_for_url("**step=10*")
    assert "answer 0 at step 10" in page.inner_text("#samples")
    page.select_option("#compare-step", "20")
    page.wait_for_url("**compare=20*")
    heads = page.locator("#samples thead th").all_inner_texts()
    assert any("step 10" in h for h in heads) and any("step 20" in h for h in heads)
    assert "prompt 2" in page.inner_text("#samples")

    # overview: runs with worker and hardware, history, outputs, snippet that recreates the job
    page.goto(f"{server.url}/dashboard/jobs/{job.id}")
    runs = page.inner_text("#runs")
    assert "dash-worker" in runs and "cpu" in runs and "completed" in runs
    outputs = page.inner_text("#outputs")  # the last value of each event field
    assert "loss" in outputs and "learning_rate" in outputs
    history = page.inner_text("#history")
    assert "created" in history and "started" in history and "job completed" in history
    snippet = page.inner_text("#snippet")
    env = base_env(tmp_path / "snippet-home")
    env.update(OPENWEIGHTS_URL=server.url, OPENWEIGHTS_API_KEY=api_key)
    out = subprocess.run(
        [sys.executable, "-c", snippet],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [job.id, "completed"]  # the same job: same content hash

    # another org sees none of it: the job's pages, its run's log and the worker are 404s
    run_id = ow.jobs.retrieve(job.id).runs[-1].id
    intruder = login(page.context.browser, server, server.signup("intruder"))
    for path in (
        f"/dashboard/jobs/{job.id}/events",
        f"/dashboard/jobs/{job.id}/samples",
        f"/dashboard/jobs/{job.id}/heatmap",
        f"/dashboard/runs/{run_id}/log/stream",
        f"/dashboard/runs/{run_id}/log.txt",
        f"/dashboard/workers/{worker_id}",
    ):
        assert intruder.goto(server.url + path).status == 404, path
    assert "dash-worker" not in intruder.goto(f"{server.url}/dashboard/workers").text()
    intruder.context.close()

    page.click("#restart-job")
    wait_until(lambda: ow.jobs.retrieve(job.id).status != "completed", 30, "restart")
    page.context.close()


def test_compare_overlays_metrics_and_diffs_params(
    server, browser, ow, api_key, start_worker, tmp_path
):
    script = tmp_path / "m.py"
    script.write_text(
        "import sys\nfrom openweights import OpenWeights\now = OpenWeights()\n"
        "lr = float(sys.argv[1])\n"
        "ow.run.log_many([{'step': s, 'loss': lr / s} for s in (1, 2, 3)])\n"
    )
    jobs = [
        ow.jobs.create(
            type="cmp", script=f"{sys.executable} {script} {lr}", params={"lr": lr, "same": 1}
        )
        for lr in (0.1, 0.2)
    ]
    start_worker(server.url, worker_token(ow), name="cmp-worker")
    for j in jobs:
        j.wait(timeout=120)
        assert j.status == "completed"
    page = login(browser, server, api_key, "/dashboard/jobs?type=cmp")
    for j in jobs:
        page.check(f'input[name=jobs][value="{j.id}"]')
    page.click("text=Compare selected")
    page.wait_for_selector('#plots[data-ready="1"]', state="attached")
    series = json.loads(page.get_attribute('figure[data-metric="loss"]', "data-series"))
    assert sorted(series) == sorted(f"{j.id} loss" for j in jobs)
    check_page(page, "compare")
    diff = page.locator("#params-diff tbody tr.differs")
    assert diff.count() == 1 and "lr" in diff.inner_text()
    assert not page.locator("#params-diff tr.same").first.is_visible()
    page.uncheck("#diff-only")
    assert page.locator("#params-diff tr.same", has_text="same").is_visible()

    # shut the worker down from its page
    page.goto(f"{server.url}/dashboard/workers")
    page.locator("#workers tbody tr", has_text="cmp-worker").get_by_role(
        "link", name="cmp-worker"
    ).click()
    runs = page.inner_text("#worker-runs")
    assert all(j.id in runs for j in jobs)
    check_page(page, "worker")
    page.click("#shutdown-worker")
    page.wait_for_url("**/dashboard/workers")
    assert "shutdown" in page.inner_text('#workers tbody tr:has-text("cmp-worker")')
    assert any(w.name == "cmp-worker" and w.status == "shutdown" for w in ow.workers.list())
    page.context.close()
