"""Deployments in a real browser: a real `api` job (`transformers serve` on the tiny model, on a
real worker) listed with its models, chatted with in the playground (two panes), and stopped."""

from __future__ import annotations

import pytest

from openweights.testing import make_tiny_model
from tests.conftest import wait_until
from tests.test_dashboard import check_page, launch_chromium, login, serve_sqlite
from tests.test_e2e import worker_token

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    yield from serve_sqlite(tmp_path_factory, request)


@pytest.fixture(scope="module")
def browser():
    yield from launch_chromium()


def test_chat_with_a_deployment_in_the_playground_and_stop_it(
    server, browser, ow, api_key, start_worker, tmp_path
):
    tiny = str(make_tiny_model(tmp_path / "tiny"))
    start_worker(server.url, worker_token(ow), "--any-hardware")
    api = ow.api.deploy(tiny, idle_timeout_s=600)
    api.up()
    job_id = api.job_id

    page = login(browser, server, api_key, "/dashboard/deployments")
    row = page.locator(f'#deployments tr[data-job="{job_id}"]')
    assert "ready" in row.inner_text() and tiny in row.inner_text()
    row.get_by_role("link", name="chat").click()
    page.wait_for_url(lambda url: "/dashboard/playground?" in url)
    page.select_option(".pg-model >> nth=1", tiny)  # a second pane, side by side
    assert page.locator(".pane").count() == 2
    page.fill("#pg-input", "apple river")
    page.press("#pg-input", "Enter")  # the keyboard sends, as in any chat
    page.wait_for_function("document.querySelectorAll('.pane .answer').length === 2")
    assert page.locator(".pane .msg.user").count() == 2
    assert page.locator(".pane .msg.error").count() == 0
    check_page(page, "playground-two-panes")

    page.goto(f"{server.url}/dashboard/deployments")
    page.locator(f'#deployments tr[data-job="{job_id}"]').get_by_role("button", name="Stop").click()
    page.wait_for_url("**/dashboard/deployments")
    wait_until(lambda: ow.jobs.retrieve(job_id).status == "canceled", 60, "deployment stopped")
    page.context.close()
