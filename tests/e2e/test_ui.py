"""The operations page in a real browser: Debian's Chromium, headless, driven by selenium
against a real API process, a real worker and realistic data (issue 9, point 5).

An operator logs in with a token, opens every page (a screenshot of each is saved to
.warden/screenshots/, printed at the end), retries a dead job with a reason and finds it
queued again and in the operator log, pauses and resumes a running data migration; a bad
token cannot log in, and a POST without the session's CSRF value is refused.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, Proc, Services, start_api, start_worker, wait_for_status
from tests.integration.test_audit_helpers import (
    Isolated,
    add_character,
    constraints_off,
    isolated,
)
from tests.support.tasks import EFFECTS_DDL

pytestmark = pytest.mark.slow

SHOTS = ROOT / ".warden" / "screenshots"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--no-first-run", "--disable-component-update",
         "--disable-sync", "--window-size=1400,1000")
FLOWER_PORT = "5599"  # only written into links: nothing listens there in this test


@dataclass
class Site:
    base: str
    iso: Isolated
    admin: str
    admin_name: str
    jobs: dict[str, str]
    shots: list[Path] = field(default_factory=list)


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("the browser tests need Chromium and its driver: apt-get install chromium "
                    "chromium-driver (.ci/run installs them); found chromium="
                    f"{chromium}, chromedriver={driver}")
    return chromium, driver


def _api(base: str, token: str, method: str, path: str, **kw: Any) -> Any:
    r = httpx.request(method, f"{base}{path}", headers={"Authorization": f"Bearer {token}"},
                      timeout=30, **kw)
    assert r.status_code < 300, r.text
    return r.json()


def _enqueue(base: str, token: str, job_type: str, params: dict[str, Any] | None = None,
             **extra: Any) -> str:
    body = {"type": job_type, "params": params or {}, **extra}
    return str(_api(base, token, "POST", "/v1/jobs", json=body)["id"])


# Characters with a broken attribute at each of 12 hours: the findings (5 points each) of
# that hour's report; the last hours leave 2 for the audit to find.
TREND = (0, 0, 1, 2, 4, 7, 3, 1, 0, 0, 1, 2)


def _health_history(conn: psycopg.Connection[Any]) -> None:
    """Twelve hourly health reports with a dip: each one computed by the report service on
    the data of its hour (characters broken, then repaired), then dated an hour apart."""
    from tasks.reports import service as reports
    from workers.db import session_scope

    broken: list[int] = []
    made = []
    for want in TREND:
        with constraints_off(conn):
            while len(broken) < want:
                broken.append(add_character(conn, strength=12))
        while len(broken) > want:
            conn.execute("UPDATE characters SET strength = 3 WHERE id = %s", (broken.pop(),))
        with session_scope() as s:
            made.append(reports.create_report(s, 24, job_id=None, alert=False,
                                              webhook_configured=False)["id"])
    for age, report_id in enumerate(reversed(made), start=1):
        conn.execute("UPDATE health_reports SET created_at = now() - make_interval(hours => %s)"
                     " WHERE id = %s", (age, report_id))


@pytest.fixture(scope="module")
def site(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A deployment of its own with data in every family: audits, reports, backups, jobs
    in several states (run by a real worker, then stopped, so what waits stays waiting)."""
    from domain.demo import seed
    from workers.app import app as celery_app
    from workers.beat import WardenScheduler

    _browser_paths()
    with isolated(services) as iso:
        backups = tmp_path_factory.mktemp("ui-backups")
        env = iso.overrides(WARDEN_BACKUP_DIR=str(backups), WARDEN_FLOWER_PORT=FLOWER_PORT)
        admin_name = f"alice-ops-{uuid.uuid4().hex[:4]}"
        from workers.tokens import create_token

        admin = create_token(admin_name, ["admin"])
        seed(120, violations=0, rng_seed=7)
        with iso.connect() as conn:
            conn.execute(EFFECTS_DDL)  # the test job types' tables
            _health_history(conn)
        worker = start_worker(services, "ui", env=env)
        api, base = start_api(services, env=env)
        procs: list[Proc] = [worker, api]
        try:
            jobs = {
                "audit": _enqueue(base, admin, "audit.integrity", {"fix": False}),
                "backup": _enqueue(base, admin, "backup.create", {"verify": True}),
                "ping": _enqueue(base, admin, "platform.ping", {"echo": "hello <b>ops</b>"}),
                "fan": _enqueue(base, admin, "testing.fan_parent", {"chunks": 3}),
                "dead": _enqueue(base, admin, "testing.flaky", {"note": "dependency down"}),
                "health": _enqueue(base, admin, "report.health", {"alert": False}),
            }
            # beat's own path (WardenScheduler.apply_async: source beat, key <entry>:<slot>)
            scheduler = WardenScheduler(app=celery_app, lazy=True)
            for entry in ("platform-heartbeat", "health-hourly"):
                fired = scheduler.apply_async(SimpleNamespace(name=entry), advance=False)
                jobs[entry] = str(fired.job["id"])
            for name in ("audit", "backup", "ping", "fan", "health", "platform-heartbeat",
                         "health-hourly"):
                wait_for_status(jobs[name], {"succeeded"}, timeout=120)
            wait_for_status(jobs["dead"], {"dead"}, timeout=60)
            report = _api(base, admin, "GET", "/v1/reports/health")["latest"]["id"]
            # no webhook configured: the alert fails for good (a failed job, not dead)
            jobs["failed"] = _enqueue(base, admin, "report.deliver_alert", {"report_id": report})
            wait_for_status(jobs["failed"], {"failed"}, timeout=60)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(
                    b["verdict"] for b in _api(base, admin, "GET", "/v1/backups")):
                time.sleep(0.5)
            worker.stop()
            # what waits now stays waiting: a countdown, and a job no worker takes
            jobs["countdown"] = _enqueue(base, admin, "platform.ping", countdown=3600)
            jobs["queued"] = _enqueue(base, admin, "platform.ping", {"echo": "nobody home"})
            yield Site(base, iso, admin, admin_name, jobs)
        finally:
            for proc in procs:
                proc.stop()


@pytest.fixture(scope="module")
def browser(site: Site, request: pytest.FixtureRequest) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.implicitly_wait(0)
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):  # this run's pages only
        old.unlink()
    try:
        yield driver
    finally:
        driver.quit()
        # Said in the run's output even without -s (a print would be captured).
        plugins = request.config.pluginmanager
        reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin(
            "capturemanager")
        if site.shots and reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\nscreenshots of /ui ({len(site.shots)}) in {SHOTS}: "
                                    + ", ".join(shot.name for shot in site.shots))


def _shot(driver: Any, site: Site, name: str) -> None:
    """A full-page screenshot: the window grown to the page's height first."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(800, min(int(height) + 40, 6000)))
    path = SHOTS / f"{len(site.shots) + 1:02d}-{name}.png"
    assert driver.save_screenshot(str(path)), path
    site.shots.append(path)
    driver.set_window_size(1400, 1000)


def _open(driver: Any, site: Site, path: str) -> None:
    driver.get(f"{site.base}{path}")
    assert "Warden" in driver.title, driver.page_source[:500]


def _text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def _submit(driver: Any, form_css: str, **fields: str) -> None:
    from selenium.webdriver.common.by import By

    form = driver.find_element(By.CSS_SELECTOR, form_css)
    for name, value in fields.items():
        box = form.find_element(By.NAME, name)
        box.clear()
        box.send_keys(value)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def _wait_text(driver: Any, needle: str, timeout: float = 10) -> str:
    """The page's text once it has `needle` (after a submit the old page may be read while
    the new one loads: its elements go stale, or the new one has no body yet, and the next
    look reads the new page)."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = _text(driver)
        except (StaleElementReferenceException, NoSuchElementException):
            # between two documents there may be no <body> yet
            time.sleep(0.05)
            continue
        except WebDriverException as exc:
            # the same race as chromium words it at times: "Node with given id does not
            # belong to the document" (the old page's body, read as the new one replaced it)
            if "does not belong to the document" not in str(exc):
                raise
            time.sleep(0.05)
            continue
        if needle in body:
            return body
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not on {driver.current_url}: {_text(driver)[:1500]}")


def test_a_bad_token_cannot_log_in(browser: Any, site: Site) -> None:
    # given the login form; when an unknown token is pasted
    _open(browser, site, "/ui/jobs")
    assert "/ui/login" in browser.current_url
    _submit(browser, "form[action='/ui/login']", token="wdn_" + "n0pe" * 10)
    # then the form says so, does not show the token, and no session cookie exists
    body = _wait_text(browser, "unknown, revoked")
    assert "n0pe" not in browser.page_source
    assert "Log in" in body and browser.get_cookie("warden_ui") is None
    _shot(browser, site, "login-refused")


def test_an_operator_logs_in_and_every_page_shows_its_data(browser: Any, site: Site) -> None:
    from selenium.webdriver.common.by import By

    # when the admin token is pasted, then the jobs page opens with an HttpOnly session
    _open(browser, site, "/ui/login?next=/ui/jobs")
    _submit(browser, "form[action='/ui/login']", token=site.admin)
    body = _wait_text(browser, "Waiting on / outcome")
    cookie = browser.get_cookie("warden_ui")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"
    assert site.admin not in browser.page_source
    assert site.admin_name in body
    # each job with what it waits on: the countdown, the dead one's last error
    for reason in ("countdown", "dead", "failed", "done"):
        assert reason in body, reason
    assert "hello <b>ops</b>" not in browser.page_source  # params are never raw HTML
    _shot(browser, site, "jobs")
    _open(browser, site, "/ui/jobs?status=failed&type=report.deliver_alert")
    assert site.jobs["failed"][:8] in _text(browser)
    _shot(browser, site, "jobs-filtered")
    # a job in full: children and the link to Flower's task page
    _open(browser, site, f"/ui/jobs/{site.jobs['fan']}")
    body = _text(browser)
    assert "Children (3, 0 pending)" in body and "testing.fan_chunk" in body
    flower = browser.find_element(By.LINK_TEXT, "Flower").get_attribute("href")
    assert flower == f"http://127.0.0.1:{FLOWER_PORT}/task/{site.jobs['fan']}"
    _shot(browser, site, "job-with-children")
    _open(browser, site, f"/ui/jobs/{site.jobs['countdown']}")
    assert "countdown: may run from" in _text(browser)
    _shot(browser, site, "job-countdown")
    _open(browser, site, "/ui/dead")
    assert site.jobs["dead"][:8] in _text(browser)
    _shot(browser, site, "dead")
    # a bulk dry run counts and changes nothing
    _open(browser, site, "/ui/bulk?action=retry&status=dead")
    _submit(browser, "#bulk-form", reason="dry run from the browser test")
    assert "Dry run: 1 job(s) match" in _wait_text(browser, "Dry run")
    _shot(browser, site, "bulk-dry-run")
    # the entries beat fired have their last success (job_stats, folded by the relay)
    deadline = time.monotonic() + 15
    while True:
        _open(browser, site, "/ui/schedules")
        body = _text(browser)
        heartbeat = body.split("platform-heartbeat", 1)[1].splitlines()[0]
        if "never" not in heartbeat or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "ago" in heartbeat and "never" not in heartbeat, heartbeat
    assert "backup-nightly" in body and "30 2 * * *" in body
    _shot(browser, site, "schedules")
    _open(browser, site, "/ui/health")
    chart = browser.find_element(By.ID, "health-chart")
    # 12 hourly reports, then the API's job and beat's: the dip is there, under the line
    assert len(chart.find_elements(By.CSS_SELECTOR, "circle")) == 14
    scores = [int(td.text) for td in browser.find_elements(
        By.CSS_SELECTOR, "#reports tbody td:nth-child(3)")]
    assert scores[-12:] == [100 - 5 * n for n in reversed(TREND)]
    assert "degraded" in _text(browser) and "healthy" in _text(browser)
    _shot(browser, site, "health")
    _open(browser, site, "/ui/audits")
    browser.find_element(By.CSS_SELECTOR, "#audits tbody a").click()
    body = _wait_text(browser, "Findings")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#findings tbody tr")) > 1
    _shot(browser, site, "audit-run")
    _open(browser, site, "/ui/audits")
    _shot(browser, site, "audits")
    _open(browser, site, "/ui/backups")
    body = _text(browser)
    assert "passed" in body and "succeeded" in body and "KiB" in body
    _shot(browser, site, "backups")
    _open(browser, site, "/ui/migrations")
    assert "legacy_spent_xp" in _text(browser)
    _shot(browser, site, "migrations")


def test_a_dead_job_is_retried_with_a_reason_and_logged(browser: Any, site: Site) -> None:
    from workers import jobstore

    dead = site.jobs["dead"]
    # given the dead job's page; when the operator retries it with a reason
    _open(browser, site, f"/ui/jobs/{dead}")
    assert "dead after 3 attempts" in _text(browser)
    _submit(browser, "#retry-form", reason="dependency restored: INC-42")
    # then it is queued again with a fresh budget (no worker runs now: it stays queued)
    _wait_text(browser, "queued again")
    row = jobstore.get(dead)
    assert row is not None
    assert (row["status"], row["attempts"], row["manual_retries"]) == ("queued", 0, 1)
    _shot(browser, site, "job-retried")
    # and the operator log has who, what and why
    _open(browser, site, "/ui/oplog")
    body = _text(browser)
    first = body.split("Details", 1)[1].splitlines()[1]
    assert site.admin_name in first and "job.retry" in first
    assert "dependency restored: INC-42" in first and dead[:8] in first
    _shot(browser, site, "operator-log")


def test_a_running_migration_is_paused_and_resumed(browser: Any, site: Site) -> None:
    from tasks.data_migrations import service
    from tests.integration.test_data_migration_service import LEGACY, _inject, _legacy
    from workers.db import session_scope

    def state() -> dict[str, Any]:
        with session_scope() as s:
            return service.summary(s, LEGACY)

    # given a slow migration running (50 ms a record, 2 characters a batch)
    with site.iso.connect() as conn:
        _legacy(conn, 150)
        _inject(conn, "PERFORM pg_sleep(0.05);")
        out: dict[str, Any] = {}
        runner = threading.Thread(
            target=lambda: out.update(service.run(LEGACY, batch_size=2)), daemon=True)
        runner.start()
        try:
            deadline = time.monotonic() + 30
            while state()["batches_done"] < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            # when the operator pauses it with a reason
            _open(browser, site, "/ui/migrations")
            assert "running" in _text(browser)
            _submit(browser, f"#migration-{LEGACY} .pause-form", reason="peak hours")
            _wait_text(browser, "pauses after its current batch")
            runner.join(30)
            # then the run stops at a checkpoint, paused with the reason
            assert out.get("status") == "paused", out
            paused = state()
            assert paused["status"] == "paused" and paused["rows_done"] < paused["rows_total"]
            _open(browser, site, "/ui/migrations")
            assert "Paused by" in _text(browser) and "peak hours" in _text(browser)
            _shot(browser, site, "migration-paused")
            # when it is resumed: queued again, a run submitted at the checkpoint
            _submit(browser, f"#migration-{LEGACY} .resume-form", reason="after peak")
            _wait_text(browser, "resumed: run")
            assert state()["status"] == "queued"
            _shot(browser, site, "migration-resumed")
        finally:
            runner.join(30)
            conn.execute("DROP TRIGGER IF EXISTS test_inject ON xp_spend_requests")


def test_a_post_without_the_csrf_value_is_refused(browser: Any, site: Site) -> None:
    from workers import jobstore

    # given the browser's session cookie (a forged form carries it, not the CSRF value)
    session = browser.get_cookie("warden_ui")["value"]
    target = site.jobs["queued"]
    for data in ({"reason": "forged"}, {"reason": "forged", "csrf": "f" * 64}):
        r = httpx.post(f"{site.base}/ui/jobs/{target}/cancel", data=data,
                       cookies={"warden_ui": session}, timeout=10, follow_redirects=False)
        # then 403, and the job is untouched
        assert r.status_code == 403, r.text
    row = jobstore.get(target)
    assert row is not None and row["status"] == "queued"
    # while the same form from the page itself works
    _open(browser, site, f"/ui/jobs/{target}")
    _submit(browser, "#cancel-form", reason="not needed after all")
    _wait_text(browser, "cancelled")
    row = jobstore.get(target)
    assert row is not None and row["status"] == "cancelled"
