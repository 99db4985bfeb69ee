"""The web dashboard in a real browser (Playwright driving Debian's chromium) against a real
server process, real workers and real jobs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from openweights.testing import conversations_rows, preference_rows, write_jsonl
from tests.conftest import wait_until
from tests.test_e2e import worker_token

CHROMIUM = os.environ.get("OPENWEIGHTS_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def serve_sqlite(tmp_path_factory, request):
    """SQLite only: the pages read the same store functions on either back end (the dashboard's
    own queries run on PostgreSQL in `test_dashboard_queries_run_on_each_backend`)."""
    from tests.conftest import Server, _server_env

    home = tmp_path_factory.mktemp("server-dash")
    srv = Server(home=home, env=_server_env(request, "sqlite", home)).start()
    yield srv
    srv.stop()


def launch_chromium():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: apt-get install chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    yield from serve_sqlite(tmp_path_factory, request)


@pytest.fixture(scope="module")
def browser():
    yield from launch_chromium()


def login(browser, server, api_key: str, path: str = "/dashboard/jobs"):
    """A fresh browser context logged in through the login form; returns its page."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    page.goto(server.url + path)
    assert "/dashboard/login" in page.url
    page.fill("#api_key", api_key)
    page.click("text=Log in")
    page.wait_for_url(f"**{path}*")
    return page


def session_cookie(page) -> str:
    return next(c["value"] for c in page.context.cookies() if c["name"] == "ow_session")


def http(server, page=None) -> httpx.Client:
    cookies = {"ow_session": session_cookie(page)} if page is not None else None
    return httpx.Client(base_url=server.url, cookies=cookies, trust_env=False, timeout=30)


# -- auth ------------------------------------------------------------------------------------


def test_signup_shows_key_once_logs_in_and_logout_ends_the_session(server, browser):
    ctx = browser.new_context()
    ctx.set_default_timeout(TIMEOUT_MS)
    page = ctx.new_page()
    page.goto(server.url + "/")
    assert "/dashboard/login" in page.url
    page.fill("#org_name", "browser lab")
    page.click("text=Create organization")
    key = page.inner_text("#new-api-key").strip()
    assert key.startswith("ow_")
    with httpx.Client(trust_env=False) as c:
        me = c.get(f"{server.url}/v1/me", headers={"authorization": f"Bearer {key}"})
    assert me.status_code == 200 and me.json()["org"]["name"] == "browser lab"
    cookie = next(c for c in ctx.cookies() if c["name"] == "ow_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert cookie["value"] != key  # the session has its own token, not the API key
    page.click("text=Go to the dashboard")
    assert page.inner_text("#org-name") == "browser lab"
    assert "ow_session" not in page.evaluate("document.cookie")
    assert key not in page.content()  # shown once, on the sign-up page only

    page.click("text=Log out")
    page.wait_for_url("**/dashboard/login*")
    with httpx.Client(
        base_url=server.url, trust_env=False, cookies={"ow_session": cookie["value"]}
    ) as c:
        r = c.get("/dashboard/jobs")
    assert r.status_code == 303 and "/dashboard/login" in r.headers["location"]

    page.fill("#api_key", "ow_not-a-key")
    page.click("text=Log in")
    assert "Invalid API key" in page.inner_text("#login-error")
    page.fill("#api_key", key)
    page.click("text=Log in")
    page.wait_for_url("**/dashboard/jobs")
    assert page.inner_text("#org-name") == "browser lab"
    ctx.close()


def test_worker_token_cannot_log_in(server, browser, ow):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(server.url + "/dashboard/login")
    page.fill("#api_key", worker_token(ow))
    page.click("text=Log in")
    assert "cannot log in" in page.inner_text("#login-error")
    ctx.close()


def test_state_changing_requests_need_the_csrf_token(server, browser, api_key, ow):
    page = login(browser, server, api_key, "/dashboard/settings")
    csrf = page.get_attribute('meta[name="csrf-token"]', "content")
    job = ow.jobs.create(type="csrf", script="echo never runs", params={"n": 1})
    with http(server, page) as c:
        r = c.post("/dashboard/settings/secrets", data={"name": "A", "value": "b"})
        assert r.status_code == 403 and "CSRF" in r.text
        r = c.post(f"/dashboard/jobs/{job.id}/cancel", data={"csrf": "0" * 64})
        assert r.status_code == 403
        assert ow.jobs.retrieve(job.id).status == "pending"
        r = c.post(
            "/dashboard/settings/secrets",
            data={"name": "A", "value": "b", "csrf": csrf},
            headers={"origin": "https://evil.example"},
        )
        assert r.status_code == 403 and "another origin" in r.text
        r = c.post(f"/dashboard/jobs/{job.id}/cancel", headers={"x-csrf-token": csrf})
        assert r.status_code == 303
    assert ow.jobs.retrieve(job.id).status == "canceled"
    page.context.close()


def test_other_orgs_ids_give_404_pages(server, browser, ow, tmp_path):
    theirs = ow.jobs.create(type="private", script="echo theirs", params={"secret_param": 42})
    their_file = ow.files.upload(
        str(write_jsonl(tmp_path / "c.jsonl", conversations_rows(2))), purpose="conversations"
    )["id"]
    page = login(browser, server, server.signup("other org"))
    assert theirs.id not in page.content()
    page.goto(f"{server.url}/dashboard/jobs?q=secret_param")
    assert page.inner_text("#jobs-total") == "0"
    for path in (
        f"/dashboard/jobs/{theirs.id}",
        f"/dashboard/jobs/{theirs.id}/logs",
        f"/dashboard/jobs/{theirs.id}/plots",
        f"/dashboard/jobs/{theirs.id}/metrics.json",
        f"/dashboard/jobs/{theirs.id}/events/stream",
        f"/dashboard/files/{their_file}",
        f"/dashboard/files/{their_file}/download",
        f"/dashboard/compare?jobs={theirs.id}&jobs={theirs.id}x",
    ):
        resp = page.goto(server.url + path)
        assert resp.status == 404, path
    page.goto(f"{server.url}/dashboard/jobs/{theirs.id}")
    assert "not found" in page.inner_text("main")
    csrf = page.get_attribute('meta[name="csrf-token"]', "content")
    with http(server, page) as c:  # actions on another org's objects: 404, nothing changes
        for path in (f"/dashboard/jobs/{theirs.id}/cancel", f"/dashboard/jobs/{theirs.id}/restart"):
            assert c.post(path, data={"csrf": csrf}).status_code == 404, path
    assert ow.jobs.retrieve(theirs.id).status == "pending"
    page.context.close()


def test_every_state_changing_route_needs_the_csrf_token(server, browser, api_key):
    """Every POST route of the dashboard (found from the router, so a new one cannot be missed)
    refuses a request that carries the session cookie but not its CSRF token."""
    from openweights.server.dashboard.routes import router

    posts = [
        r.path
        for r in router.routes
        if "POST" in getattr(r, "methods", ()) and not r.path.endswith(("/login", "/signup"))
    ]
    assert len(posts) >= 10, posts
    page = login(browser, server, api_key)
    with http(server, page) as c:
        for path in posts:
            url = path.replace("{job_id}", "job-x").replace("{worker_id}", "worker-x")
            url = url.replace("{token_id}", "tok-x").replace("{name}", "X")
            r = c.post(url, data={"name": "A", "value": "b"})
            assert r.status_code == 403 and "CSRF" in r.text, (path, r.status_code)
            r = c.post(url, json={"model": "m", "messages": []})
            assert r.status_code == 403, path
        # login and sign-up have no session yet: a cross-site form post is refused by origin
        for path in ("/dashboard/login", "/dashboard/signup"):
            r = c.post(path, data={"org_name": "x"}, headers={"origin": "https://evil.example"})
            assert r.status_code == 403, path
    page.context.close()


def test_dashboard_is_not_in_the_api_schema(server):
    with httpx.Client(trust_env=False) as c:
        paths = c.get(f"{server.url}/openapi.json").json()["paths"]
    assert paths and all(p.startswith(("/v1/", "/health")) for p in paths), sorted(paths)


# -- jobs list -------------------------------------------------------------------------------


def test_jobs_list_filters_and_pages_on_the_server_keeping_filters_in_the_url(
    server, browser, ow, api_key
):
    for i in range(55):
        ow.jobs.create(type="sweep", script="echo x", params={"lr": i}, model="org/small")
    for i in range(3):
        ow.jobs.create(
            type="probe", script="echo y", params={"needle": f"haystack-{i}"}, model="org/big"
        )
    page = login(browser, server, api_key)
    assert int(page.inner_text("#jobs-total")) == 58
    assert page.locator("#jobs tbody tr").count() == 50
    page.click("#next-page")
    page.wait_for_url("**after=*")
    page.wait_for_function("document.querySelectorAll('#jobs tbody tr').length === 8")

    page.goto(server.url + "/dashboard/jobs")
    page.select_option("select[name=type]", "probe")
    page.wait_for_url("**type=probe*")
    page.wait_for_function("document.querySelector('#jobs-total').textContent === '3'")
    page.fill("input[name=q]", "haystack-1")
    page.wait_for_url("**q=haystack-1*")
    page.wait_for_function("document.querySelector('#jobs-total').textContent === '1'")
    page.reload()  # the URL alone restores the filtered view
    assert page.inner_text("#jobs-total") == "1"
    assert page.input_value("input[name=q]") == "haystack-1"
    assert page.input_value("select[name=type]") == "probe"
    page.goto(server.url + "/dashboard/jobs?model=big&status=pending")
    assert page.inner_text("#jobs-total") == "3"
    page.context.close()


def test_cancel_from_the_job_page(server, browser, ow, api_key):
    job = ow.jobs.create(type="waits", script="sleep 600", params={"n": 2})
    page = login(browser, server, api_key, f"/dashboard/jobs/{job.id}")
    listing = page.context.new_page()
    listing.goto(f"{server.url}/dashboard/jobs?type=waits")
    assert "pending" in listing.inner_text(f'tr[data-job="{job.id}"]')
    page.click("#cancel-job")
    page.wait_for_selector("#restart-job")
    assert ow.jobs.retrieve(job.id).status == "canceled"
    assert "canceled by user" in page.inner_text("#job-error")
    # the open list shows the new status without a reload
    listing.wait_for_selector(f'tr[data-job="{job.id}"] .s-canceled')
    page.context.close()


# -- files, workers, settings ----------------------------------------------------------------


def test_file_preview_renders_chats_and_preference_pairs_and_downloads(
    server, browser, ow, api_key, tmp_path
):
    conv_path = write_jsonl(tmp_path / "train.jsonl", conversations_rows(25))
    conv = ow.files.upload(str(conv_path), purpose="conversations")["id"]
    pref = ow.files.upload(
        str(write_jsonl(tmp_path / "p.jsonl", preference_rows(3))), purpose="preference"
    )["id"]
    page = login(browser, server, api_key, "/dashboard/files")
    files = page.inner_text("#files")
    assert conv in files and pref in files and "train.jsonl" in files
    page.click(f"text={conv}")
    assert page.get_attribute("#preview", "data-kind") == "chat"
    assert page.locator("article.chat").count() == 20
    first = json.loads(conv_path.read_text().splitlines()[0])
    assert first["messages"][0]["content"] in page.locator("article.chat").first.inner_text()
    page.click("#next-page")
    page.wait_for_url("**page=1")
    assert page.locator("article.chat").count() == 5
    with page.expect_download() as dl:
        page.click("#download")
    assert Path(dl.value.path()).read_bytes() == conv_path.read_bytes()

    page.goto(f"{server.url}/dashboard/files/{pref}")
    assert page.get_attribute("#preview", "data-kind") == "preference"
    assert page.locator("article.pref").count() == 3
    assert page.locator(".chosen").count() == 3 and page.locator(".rejected").count() == 3
    pref_rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    chosen = page.locator("article.pref").first.locator(".chosen").inner_text()
    assert _text(pref_rows[0]["chosen"]) in chosen

    # batch-inference results: a table of input and completion
    rows = [
        {"messages": [{"role": "user", "content": f"question {i}"}], "completion": f"answer {i}"}
        for i in range(4)
    ]
    res = ow.files.upload(str(write_jsonl(tmp_path / "r.jsonl", rows)), purpose="result")["id"]
    page.goto(f"{server.url}/dashboard/files/{res}")
    assert page.get_attribute("#preview", "data-kind") == "completion"
    cells = page.locator("#preview table tbody tr").first.locator("td").all_inner_texts()
    assert "question 0" in cells[0] and cells[1].strip() == "answer 0"
    assert page.locator("#preview table tbody tr").count() == 4
    page.context.close()


def _text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return next(m["content"] for m in value if isinstance(m, dict))
    return str(value)


def test_settings_tokens_shown_once_and_revoked_secrets_write_only(server, browser, api_key):
    page = login(browser, server, api_key, "/dashboard/settings")
    page.fill("#create-token input[name=name]", "ci key")
    page.fill("#create-token input[name=expires_in_days]", "7")
    page.click("#create-token button")
    secret = page.inner_text("#new-token-secret").strip()
    with httpx.Client(base_url=server.url, trust_env=False) as c:
        auth = {"authorization": f"Bearer {secret}"}
        assert c.get("/v1/me", headers=auth).status_code == 200
        page.goto(server.url + "/dashboard/settings")
        assert secret not in page.content()  # shown once
        row = page.locator("#tokens tbody tr", has_text="ci key")
        assert "active" in row.inner_text() and "never" not in row.inner_text()
        row.get_by_role("button", name="Revoke").click()
        page.wait_for_load_state()
        assert "revoked" in page.locator("#tokens tbody tr", has_text="ci key").inner_text()
        assert c.get("/v1/me", headers=auth).status_code == 401

    value = "s3cr3t-value-never-shown"
    page.fill("#set-secret input[name=name]", "HF_TOKEN")
    page.fill("#set-secret input[name=value]", value)
    page.click("#set-secret button")
    page.wait_for_selector("#secrets >> text=HF_TOKEN")
    assert value not in page.content()
    with http(server, page) as c:
        for path in ("/dashboard/settings", "/dashboard/jobs", "/dashboard/workers"):
            assert value not in c.get(path).text
    page.locator("#secrets tbody tr", has_text="HF_TOKEN").get_by_role("button").click()
    page.wait_for_selector("#secrets >> text=No secrets.")
    page.context.close()


UNNAMED_CONTROLS = """() => Array.from(document.querySelectorAll(
        'input:not([type=hidden]), select, button, textarea'))
    .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                  && !el.textContent.trim()).map(el => el.outerHTML)"""
OVERFLOW = """() => document.documentElement.scrollWidth - document.documentElement.clientWidth"""


def check_page(page, name: str) -> None:
    """Every control has an accessible name and the page does not scroll sideways (wide tables
    scroll inside their card); with OPENWEIGHTS_TEST_SHOTS=dir, a full-page screenshot too."""
    assert page.evaluate(UNNAMED_CONTROLS) == [], name
    assert page.evaluate(OVERFLOW) <= 0, f"{name} overflows sideways"
    shots = os.environ.get("OPENWEIGHTS_TEST_SHOTS")
    if shots:
        w = page.viewport_size["width"]
        page.screenshot(path=str(Path(shots) / f"{name}-{w}.png"), full_page=True)


def test_pages_have_labels_and_work_with_the_keyboard(server, browser, api_key):
    page = login(browser, server, api_key, "/dashboard/jobs")
    for width, height in ((1920, 1080), (1280, 720)):  # desktop, laptop
        page.set_viewport_size({"width": width, "height": height})
        for name in ("jobs", "files", "models", "deployments", "playground", "workers", "cost",
                     "settings"):  # fmt: skip
            page.goto(f"{server.url}/dashboard/{name}")
            check_page(page, name)
    page.goto(f"{server.url}/dashboard/jobs")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.name") == "status"
    page.context.close()


def test_cost_page_shows_the_queue_against_capacity(server, browser, ow, api_key):
    ow.jobs.create(type="big", script="echo", params={"n": 1}, requires_vram_gb=80)
    ow.jobs.create(type="big", script="echo", params={"n": 2}, requires_vram_gb=80)
    page = login(browser, server, api_key, "/dashboard/cost")
    assert page.inner_text("#cost-total") == "$0.00"
    row = page.locator("#queue tbody tr", has_text="80")
    assert "none fits" in row.inner_text()
    assert row.locator("td").nth(1).inner_text() == "2"
    page.goto(f"{server.url}/dashboard/models")
    assert "No models yet" in page.inner_text("#models")
    page.context.close()


def test_cost_page_shows_spend_per_job_per_day_and_for_the_org(server, browser):
    """A run of one hour on a pod (written into the server's database: no cloud here) costs the
    pod's recorded hourly price, on the job, its day and the org's total; the pod's billed time
    (launch to termination) shows beside it."""
    from sqlalchemy import insert

    from openweights import OpenWeights
    from openweights.cluster.catalog import DEFAULT_CATALOG
    from openweights.server.dashboard._render import ts
    from openweights.store import schema as s
    from openweights.store.db import Database

    offer = next(o for o in DEFAULT_CATALOG.offers() if o.count == 1 and o.price_per_hour > 0)
    key = server.signup("payer")
    ow = OpenWeights(base_url=server.url, api_key=key)
    job = ow.jobs.create(type="priced", script="echo", params={"n": 1})
    db = Database(f"sqlite:///{server.home / 'openweights.db'}")
    try:
        with db.write() as conn:
            now = db.now(conn)
            pk, org = conn.execute(
                s.jobs.select()
                .with_only_columns(s.jobs.c.pk, s.jobs.c.org_id)
                .where(s.jobs.c.id == job.id)
            ).one()
            conn.execute(
                insert(s.workers).values(
                    id="worker-pod0000001", org_id=org, name="pod-1", status="shutdown",
                    hardware={"gpu_count": 1, "gpu_type": offer.gpu, "cpu_count": 8,
                              "memory_gb": 32.0},
                    hardware_type=offer.hardware_type, vram_gb=offer.vram_gb, any_hardware=False,
                    cached_models=[], provider="runpod", last_seen_at=now, created_at=now,
                )
            )  # fmt: skip
            conn.execute(
                insert(s.runs).values(
                    org_id=org, job_pk=pk, worker_id="worker-pod0000001", attempt=1,
                    status="completed", started_at=now - 7200, finished_at=now - 3600,
                    log_size=0, hardware=offer.hardware_type,
                )
            )  # fmt: skip
            conn.execute(
                insert(s.cluster_pods).values(
                    org_id=org, provider="runpod", pod_id="rp-1", name="pod-1",
                    hardware_type=offer.hardware_type, price_per_hour=1.5,
                    launched_at=now - 7200, terminated_at=now - 3400,
                )
            )  # fmt: skip
    finally:
        db.dispose()
    page = login(browser, server, key, "/dashboard/cost")
    assert page.inner_text("#cost-total") == "$1.50"  # the pod's price, not the catalog's
    assert "$1.58" in page.inner_text("#cost-billed")  # 3,800 s billed at $1.5/h
    day = ts(now - 7200)[:10]
    assert page.locator("#cost-by-day tbody tr").all_inner_texts() == [f"{day}\t1.5000\t1.5833"]
    row = page.locator("#cost-by-job tbody tr", has_text=job.id)
    assert "1.5000" in row.inner_text() and "1.000" in row.inner_text()  # USD, busy hours
    page.goto(f"{server.url}/dashboard/jobs/{job.id}")
    assert "$1.5000" in page.inner_text("#runs")
    assert "pod-1" in page.inner_text("#runs") and offer.hardware_type in page.inner_text("#runs")
    page.context.close()


def test_dashboard_queries_run_on_each_backend(db):
    """The dashboard's own read queries (search, facets, event types, metric series, samples,
    queue) give the same answers on SQLite and PostgreSQL."""
    from sqlalchemy import insert

    from openweights.store import dashboard as dq
    from openweights.store import jobs as q
    from openweights.store import orgs
    from openweights.store import schema as s
    from openweights.types import JobCreateParams

    with db.write() as conn:
        now = db.now(conn)
        org = orgs.create_org(conn, "a", now)["id"]
        other = orgs.create_org(conn, "b", now)["id"]
        for i in range(5):
            q.create_job(
                conn,
                org,
                JobCreateParams(
                    type="sweep",
                    script="x",
                    params={"lr": i, "note": "50%_off"},
                    model="org/small",
                    requires_vram_gb=8,
                ),
                now + i,
                3,
                lock=False,
            )
        q.create_job(
            conn,
            other,
            JobCreateParams(type="sweep", script="x", params={"lr": 1}),
            now,
            3,
            lock=False,
        )
        job = q.list_jobs(conn, org, limit=1)[0][0]
        conn.execute(
            insert(s.workers).values(
                id="worker-priced", org_id=org, name="pod", status="active", hardware={},
                hardware_type="2x A100", vram_gb=160.0, any_hardware=False, cached_models=[],
                provider="runpod", last_seen_at=now, created_at=now,
            )
        )  # fmt: skip
        run_id = conn.execute(
            insert(s.runs)
            .values(
                org_id=org,
                job_pk=job["pk"],
                worker_id="worker-priced",
                attempt=1,
                status="completed",
                started_at=now,
                finished_at=now + 1800,
                log_size=0,
            )
            .returning(s.runs.c.id)
        ).scalar_one()
        rows = [{"type": "progress", "step": k, "loss": 1.0 / k} for k in (1, 2, 3)]
        rows += [
            {"type": "logp_mean", "step": k, "dataset": "d", "tag": t, "logp_mean": -k}
            for k in (1, 2)
            for t in ("x", "y")
        ]
        rows += [{"type": "logp", "step": 1, "dataset": "d", "tag": "x", "row": 0, "logp": -9.0}]
        rows += [
            {"note": "no type"},
            {"type": "samples", "tag": "s", "step": 2, "file": "result:file-1"},
        ]
        conn.execute(
            insert(s.events),
            [
                {"org_id": org, "run_id": run_id, "job_pk": job["pk"], "data": d, "created_at": now}
                for d in rows
            ],
        )

    with db.read() as conn:
        page, more, total = dq.search_jobs(
            conn,
            org,
            status="pending",
            type="sweep",
            model="small",
            text="50%_",
            limit=2,
            after=None,
        )
        assert total == 5 and more and len(page) == 2
        page2, more2, _ = dq.search_jobs(
            conn, org, status=None, type=None, model=None, text=None, limit=10, after=page[-1]["id"]
        )
        assert len(page2) == 3 and not more2
        assert (
            dq.search_jobs(
                conn, org, status=None, type=None, model=None, text='lr\\":1', limit=10, after=None
            )[2]
            == 0
        )  # LIKE wildcards are escaped
        assert (
            dq.search_jobs(
                conn, other, status=None, type=None, model="small", text=None, limit=10, after=None
            )[2]
            == 0
        )
        assert dq.job_facets(conn, org) == {"types": ["sweep"], "status_counts": {"pending": 5}}
        assert dq.event_types(conn, org, job["pk"]) == [
            "(none)",
            "logp",
            "logp_mean",
            "progress",
            "samples",
        ]
        got, _ = dq.job_events(
            conn, org, job["pk"], run_id=None, type="logp_mean", after=None, limit=50
        )
        assert len(got) == 4
        got, _ = dq.job_events(
            conn, org, job["pk"], run_id=None, type="(none)", after=None, limit=50
        )
        assert [e["data"] for e in got] == [{"note": "no type"}]
        m = dq.metrics(conn, org, job["pk"], None)["metrics"]
        assert m["loss"] == {"loss": [[1.0, 2.0, 3.0], [1.0, 0.5, 1 / 3]]}
        assert sorted(m["logp_mean"]) == [
            "logp_mean [dataset=d, tag=x]",
            "logp_mean [dataset=d, tag=y]",
        ]
        assert "logp" not in m  # per-row events are not plotted as a line
        assert dq.sample_events(conn, org, job["pk"])["s"][0]["file"] == "result:file-1"
        groups = dq.pending_groups(conn, org)
        assert len(groups) == 1 and groups[0]["n"] == 5 and groups[0]["requires_vram_gb"] == 8
        assert dq.count_events(conn, other, job["pk"]) == 0
        spent = dq.spend(conn, org, lambda hw: 4.0 if hw == "2x A100" else 0.0, now=now)
        assert spent["total"] == pytest.approx(2.0) and spent["runs"] == 1
        assert spent["days"] == [(int(now // 86400), pytest.approx(2.0))]
        assert spent["jobs"] == [(job["id"], pytest.approx(2.0), pytest.approx(0.5), "2x A100")]
        assert dq.spend(conn, other, lambda hw: 4.0, now=now)["total"] == 0.0


def test_user_content_is_escaped_not_run(server, browser, ow, api_key, tmp_path):
    evil = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'
    job = ow.jobs.create(type="xss", script=f"echo '{evil}'", params={"note": evil})
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [{"messages": [{"role": "user", "content": evil}, {"role": "assistant", "content": "ok"}]}],
    )
    fid = ow.files.upload(str(path), purpose="conversations")["id"]
    page = login(browser, server, api_key, f"/dashboard/jobs/{job.id}")
    assert evil in page.inner_text("#job-params").replace('\\"', '"')
    assert page.evaluate("window.pwned") is None
    page.goto(f"{server.url}/dashboard/files/{fid}")
    assert evil in page.inner_text("article.chat")
    assert page.evaluate("window.pwned") is None
    page.goto(f"{server.url}/dashboard/jobs?q=onerror")
    assert page.locator("#jobs tbody tr").count() == 1
    assert page.evaluate("window.pwned") is None
    page.context.close()


def test_session_expires(server, browser, api_key):
    """A session is a token with an expiry: once it has passed, pages send the browser to log in.
    (The clock is moved by setting the session token's expiry in the server's database.)"""
    from sqlalchemy import update

    from openweights.store import orgs
    from openweights.store import schema as s
    from openweights.store.db import Database

    page = login(browser, server, api_key, "/dashboard/workers")
    secret = session_cookie(page)
    db = Database(f"sqlite:///{server.home / 'openweights.db'}")
    try:
        with db.write() as conn:
            row = conn.execute(
                update(s.tokens)
                .where(s.tokens.c.token_hash == orgs.hash_token(secret))
                .values(expires_at=1.0)
                .returning(s.tokens.c.name)
            ).one()
    finally:
        db.dispose()
    assert row.name == "dashboard session"
    with http(server, page) as c:  # verified tokens are cached for at most 10 s
        wait_until(lambda: c.get("/dashboard/workers").status_code == 303, 30, "expiry", 0.5)
        r = c.get("/dashboard/workers")
        assert "/dashboard/login" in r.headers["location"] and "session" in r.headers["location"]
    page.reload()
    assert "/dashboard/login" in page.url
    page.context.close()
