"""The operations page over HTTP (no browser): its session cookie, CSRF refusals, scopes,
escaping, and what each page shows, against a real database (issue 9, point 5).

The browser test (tests/e2e/test_ui.py) drives the same pages in Chromium; these pin the
rules a browser cannot show: the cookie's attributes, the 403s, the escaping.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import Services
from tests.integration.test_audit_helpers import Isolated, add_character, constraints_off, isolated

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
PAGES = ("/ui/jobs", "/ui/dead", "/ui/bulk", "/ui/oplog", "/ui/schedules", "/ui/health",
         "/ui/audits", "/ui/migrations", "/ui/backups")


@pytest.fixture(scope="module")
def iso(services: Services) -> Iterator[Isolated]:
    with isolated(services) as found:
        yield found


@pytest.fixture(scope="module")
def app(iso: Isolated) -> Any:
    from api_stub.app import create_app

    return create_app(run_relay=False)


@pytest.fixture(scope="module")
def tokens(iso: Isolated) -> dict[str, str]:
    return {"admin": iso.token("admin"), "read": iso.token("read"),
            "enqueue": iso.token("enqueue")}


def _client(app: Any, base: str = "http://testserver") -> TestClient:
    return TestClient(app, base_url=base, follow_redirects=False)


def _csrf(html: str) -> str:
    found = CSRF.search(html)
    assert found, html[:2000]
    return found.group(1)


def _login(client: TestClient, token: str) -> str:
    """Log in through the form; returns the session's CSRF value (from a page's forms)."""
    form = client.get("/ui/login")
    r = client.post("/ui/login", data={"token": token, "csrf": _csrf(form.text),
                                       "next": "/ui/jobs"})
    assert r.status_code == 303, r.text
    return _csrf(client.get("/ui/jobs").text)


def _submit(job_type: str = "platform.ping", params: dict[str, Any] | None = None,
            **cols: Any) -> str:
    """A job through the enqueue path, then put in the state the test needs."""
    from workers.db import session_scope
    from workers.enqueue import submit

    job_id = str(submit(job_type, params or {}).job["id"])
    if cols:
        from sqlalchemy import text

        sets = ", ".join(f"{k} = :{k}" for k in cols)
        with session_scope() as s:
            s.execute(text(f"UPDATE job_runs SET {sets} WHERE id = :id"), {**cols, "id": job_id})
    return job_id


def test_pages_need_a_session_and_login_sets_a_strict_httponly_cookie(
        app: Any, tokens: dict[str, str]) -> None:
    with _client(app) as client:
        # given no session: every page sends the browser to the login form, keeping the path
        r = client.get("/ui/jobs?status=dead")
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/login?next=%2Fui%2Fjobs%3Fstatus%3Ddead"
        # when a good token logs in
        form = client.get("/ui/login")
        assert "Content-Security-Policy" in form.headers
        r = client.post("/ui/login", data={"token": tokens["read"], "csrf": _csrf(form.text),
                                           "next": "/ui/schedules"})
        # then the session cookie is HttpOnly, SameSite=Strict, scoped to /ui, not Secure on
        # plain http, and the pages open
        assert r.status_code == 303 and r.headers["location"] == "/ui/schedules"
        cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("warden_ui="))
        attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/ui"} <= attrs
        assert "secure" not in attrs
        assert "max-age=28800" in attrs
        for page in PAGES:
            assert client.get(page).status_code == 200, page
        # and logging out ends it
        r = client.post("/ui/logout", data={"csrf": _csrf(client.get("/ui/jobs").text)})
        assert r.status_code == 303
        assert client.get("/ui/jobs").status_code == 303


def test_over_https_the_cookie_is_secure(app: Any, tokens: dict[str, str]) -> None:
    with _client(app, "https://testserver") as client:
        form = client.get("/ui/login")
        r = client.post("/ui/login", data={"token": tokens["read"], "csrf": _csrf(form.text)})
        cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("warden_ui="))
        assert "secure" in {a.strip().lower() for a in cookie.split(";")}


def test_outside_dev_the_cookie_is_secure_even_when_the_api_sees_http(
        app: Any, tokens: dict[str, str]) -> None:
    # given a deployment that is not dev, behind a TLS proxy on another host: the browser
    # speaks https, uvicorn trusts no forwarded header and sees http (review N17)
    from workers.settings import get_settings

    saved = os.environ.get("WARDEN_ENV")
    os.environ["WARDEN_ENV"] = "prod"
    get_settings.cache_clear()
    try:
        with _client(app) as client:
            form = client.get("/ui/login")
            # (the browser sends the login cookie back over its https; this client, seeing
            # http, would not send a Secure cookie, so it is sent by hand)
            login = next(c for c in form.headers.get_list("set-cookie")
                         if c.startswith("warden_ui_login="))
            nonce = login.split(";")[0].split("=", 1)[1]
            r = client.post("/ui/login", data={"token": tokens["read"], "csrf": _csrf(form.text)},
                            headers={"Cookie": f"warden_ui_login={nonce}"})
    finally:
        if saved is None:
            os.environ.pop("WARDEN_ENV", None)
        else:
            os.environ["WARDEN_ENV"] = saved
        get_settings.cache_clear()
    # then both cookies, the session's (the token itself) above all, are Secure
    assert r.status_code == 303, r.text
    session = next(c for c in r.headers.get_list("set-cookie") if c.startswith("warden_ui="))
    assert "secure" in {a.strip().lower() for a in session.split(";")}
    assert "secure" in {a.strip().lower() for a in login.split(";")}


def test_a_bad_token_or_a_forged_login_cannot_log_in_and_the_token_is_never_echoed(
        app: Any, tokens: dict[str, str]) -> None:
    with _client(app) as client:
        form = client.get("/ui/login")
        bad = "wdn_" + "x" * 43
        # a token that does not exist: 401, the form again, no session, no echo
        r = client.post("/ui/login", data={"token": bad, "csrf": _csrf(form.text)})
        assert r.status_code == 401
        assert "unknown, revoked" in r.text and bad not in r.text
        assert "warden_ui=" not in " ".join(r.headers.get_list("set-cookie"))
        # a token without the read scope cannot either
        r = client.post("/ui/login", data={"token": tokens["enqueue"],
                                           "csrf": _csrf(r.text)})
        assert r.status_code == 401
        # a login POST from another site (no double-submit value): 403 before any lookup
        r = client.post("/ui/login", data={"token": tokens["admin"]})
        assert r.status_code == 403
        # and a next= pointing elsewhere is not followed
        r = client.post("/ui/login", data={"token": tokens["admin"],
                                           "csrf": _csrf(client.get("/ui/login").text),
                                           "next": "//evil.example/ui"})
        assert r.headers["location"] == "/ui/jobs"


def test_actions_need_the_csrf_value_the_admin_scope_and_a_reason(
        app: Any, tokens: dict[str, str]) -> None:
    from workers import jobstore

    job_id = _submit(status="dead", attempts=5, error_code="transient:X")
    url = f"/ui/jobs/{job_id}/retry"
    with _client(app) as admin, _client(app) as reader:
        csrf = _login(admin, tokens["admin"])
        # without the CSRF value, or with another session's: 403, nothing changes
        assert admin.post(url, data={"reason": "fixed"}).status_code == 403
        assert admin.post(url, data={"reason": "fixed", "csrf": "0" * 64}).status_code == 403
        reader_csrf = _login(reader, tokens["read"])
        assert admin.post(url, data={"reason": "fixed", "csrf": reader_csrf}).status_code == 403
        # a read token with its own valid CSRF value: 403 (no admin scope)
        r = reader.post(url, data={"reason": "fixed", "csrf": reader_csrf})
        assert r.status_code == 403 and "lacks the &#39;admin&#39; scope" in r.text
        # the read token sees no action forms
        assert 'id="retry-form"' not in reader.get(f"/ui/jobs/{job_id}").text
        # an admin without a reason: back to the job with the refusal, nothing changes
        r = admin.post(url, data={"reason": "  ", "csrf": csrf})
        assert r.status_code == 303
        assert "needs a reason" in admin.get(r.headers["location"]).text
        row = jobstore.get(job_id)
        assert row is not None and row["status"] == "dead"
        # with one: queued again with a fresh budget, and the operator log says who and why
        r = admin.post(url, data={"reason": "broker fixed: INC-9", "csrf": csrf})
        assert r.status_code == 303
        assert "queued again" in admin.get(r.headers["location"]).text
        row = jobstore.get(job_id)
        assert row is not None and (row["status"], row["manual_retries"]) == ("queued", 1)
        log = admin.get("/ui/oplog").text
        assert "broker fixed: INC-9" in log and "job.retry" in log
        # a second retry is refused with the job's state
        r = admin.post(url, data={"reason": "again", "csrf": csrf})
        assert "only failed or dead jobs can be retried" in admin.get(r.headers["location"]).text


def test_everything_shown_is_escaped(app: Any, tokens: dict[str, str]) -> None:
    evil = "<script>alert('x')</script>"
    job_id = _submit(params={"echo": evil}, status="failed", error_code="boom",
                     error_message=evil)
    with _client(app) as client:
        _login(client, tokens["read"])
        page = client.get(f"/ui/jobs/{job_id}").text
        assert "<script>" not in page
        assert "&lt;script&gt;" in page
        listing = client.get("/ui/jobs?status=failed").text
        assert job_id[:8] in listing and "<script>" not in listing
        # a filter value is escaped too, and an unknown status is said, not a 500
        r = client.get('/ui/jobs?status="><b>x&type=<i>')
        assert r.status_code == 200 and "<b>x" not in r.text and "<i>" not in r.text


def test_bulk_dry_run_counts_then_cancels_by_filter(app: Any, tokens: dict[str, str]) -> None:
    from workers import jobstore

    job_type = "platform.ping"
    kept = _submit(job_type, {"echo": uuid.uuid4().hex})
    with _client(app) as client:
        csrf = _login(client, tokens["admin"])
        queued = jobstore.list_jobs(status="queued", job_type=job_type, limit=500)
        body = {"action": "cancel", "status": "queued", "type": job_type,
                "reason": "stop the pings", "csrf": csrf}
        dry = client.post("/ui/bulk", data={**body, "dry_run": "1"})
        assert dry.status_code == 200
        assert f"{len(queued)} job(s) match; nothing changed" in dry.text
        assert jobstore.get(kept)["status"] == "queued"  # type: ignore[index]
        done = client.post("/ui/bulk", data=body)
        assert f"changed {len(queued)} of {len(queued)}" in done.text
        assert jobstore.get(kept)["status"] == "cancelled"  # type: ignore[index]
        # a filter the action cannot touch is refused with why
        wrong = client.post("/ui/bulk", data={**body, "status": "succeeded"})
        assert wrong.status_code == 422 and "cancel applies to queued, retrying" in wrong.text
        assert "job.bulk_cancel" in client.get("/ui/oplog").text


def test_health_audits_and_schedules_show_the_families_data(
        app: Any, iso: Isolated, tokens: dict[str, str]) -> None:
    from sqlalchemy import text

    from tasks.audits import service as audits
    from tasks.reports import service as reports
    from workers import stats
    from workers.db import session_scope

    # given broken characters found by an audit, and three health reports
    with iso.connect() as conn, constraints_off(conn):
        add_character(conn, xp=-5)
        add_character(conn, strength=12)
    with session_scope() as s:
        run = audits.run_audit(s)
    for _ in range(3):
        with session_scope() as s:
            reports.create_report(s, 24, job_id=None, alert=False, webhook_configured=False)
    # and a beat job of platform-heartbeat that succeeded
    beat = _submit(status="queued")
    with session_scope() as s:
        s.execute(text("UPDATE job_runs SET source = 'beat', idempotency_key = :k, "
                       "status = 'succeeded', finished_at = now() WHERE id = :id"),
                  {"k": f"platform-heartbeat:{uuid.uuid4().hex}", "id": beat})
    stats.fold_all()
    with _client(app) as client:
        _login(client, tokens["read"])
        health = client.get("/ui/health").text
        # then the chart has a point per report, below the healthy line
        assert health.count('<circle class="pt') == 3
        assert 'id="health-chart"' in health and "<polyline" in health
        audit_list = client.get("/ui/audits").text
        assert f'href="/ui/audits/{run["id"]}"' in audit_list
        detail = client.get(f"/ui/audits/{run['id']}").text
        assert "xp" in detail and "strength" in detail
        assert client.get("/ui/audits/999999").status_code == 404
        sched = client.get("/ui/schedules").text
        row = sched.split("platform-heartbeat", 1)[1].split("</tr>", 1)[0]
        assert "never" not in row and "ago" in row
        assert "backup-nightly" in sched and "30 2 * * *" in sched


def test_the_next_run_and_the_chart_are_computed_not_guessed() -> None:
    from datetime import UTC, datetime, timedelta

    from api_stub.routes.ui import health_chart, schedule_rows

    now = datetime.now(UTC)
    rows = {r["entry"].name: r for r in schedule_rows()}
    nxt = rows["platform-heartbeat"]["next"]
    assert now < nxt <= now + timedelta(minutes=5)
    assert nxt.minute % 5 == 0 and nxt.second == 0
    chart = health_chart([
        {"id": 1, "created_at": now - timedelta(hours=2), "health_score": 100,
         "status": "healthy"},
        {"id": 2, "created_at": now, "health_score": 50, "status": "degraded"},
    ])
    first, last = chart.points
    assert first["y"] == chart.top and last["y"] == chart.top + chart.plot_h / 2
    assert first["x"] == chart.left and last["x"] == chart.left + chart.plot_w


def test_the_page_stays_out_of_the_api_document_and_redirects_only_to_itself(app: Any) -> None:
    from api_stub.routes.ui import _safe_next

    assert not [p for p in app.openapi()["paths"] if p.startswith("/ui")]
    assert _safe_next("/ui/dead?type=x") == "/ui/dead?type=x"
    for elsewhere in ("//evil.example", "https://evil.example/ui", "/ui.evil/x", "/v1/jobs",
                      "/ui//evil.example", "/ui/\\evil", None, ""):
        assert _safe_next(elsewhere) == "/ui/jobs", elsewhere


def test_displays_do_not_contradict_the_state(app: Any, tokens: dict[str, str]) -> None:
    """Drill D5: a paused migration showed an ETA, a succeeded one a red "Last error", and a
    retried job the last run's start, worker and red error as if current."""
    from sqlalchemy import text

    from tasks.data_migrations import opening_balances, service, spent_xp
    from workers import operator
    from workers.db import session_scope

    # given a paused migration part-way (its run's job ended succeeded when the pause
    # stopped it), and a succeeded one whose first attempt failed
    run_job = _submit(status="succeeded")
    with session_scope() as s:
        for name in (spent_xp.NAME, opening_balances.NAME):
            service.state(s, name)
        s.execute(text("UPDATE data_migrations SET status = 'paused', rows_done = 10, "
                       "rows_total = 100, seconds_running = 5, job_id = :j WHERE name = :n"),
                  {"n": spent_xp.NAME, "j": run_job})
        s.execute(text("UPDATE data_migrations SET status = 'succeeded', rows_done = 100, "
                       "rows_total = 100, seconds_running = 5, attempts = 2, "
                       "last_error = 'verify: 1 rows still to migrate', "
                       "last_error_at = now() WHERE name = :n"), {"n": opening_balances.NAME})
        shown = {m["name"]: m for m in service.list_migrations(s)}
    # and a failed job, retried by an operator
    job = _submit(status="failed", attempts=1, worker="w9@host:1", error_code="internal_error",
                  error_message="the last run's error")
    with session_scope() as s:
        s.execute(text("UPDATE job_runs SET started_at = now() - interval '1 minute', "
                       "finished_at = now() WHERE id = :id"), {"id": job})
    operator.retry(uuid.UUID(job), actor="test", reason="fixed")
    # then the API's (and CLI's) summary has no ETA for the paused one, no error for the
    # succeeded one
    assert shown[spent_xp.NAME]["eta_seconds"] is None
    assert shown[opening_balances.NAME]["last_error"] is None
    with _client(app) as client:
        _login(client, tokens["admin"])
        page = client.get("/ui/migrations").text
        paused = page.split(f'id="migration-{spent_xp.NAME}"', 1)[1].split("</section>", 1)[0]
        done = page.split(f'id="migration-{opening_balances.NAME}"', 1)[1].split(
            "</section>", 1)[0]
        # and the page neither
        assert "ETA" not in paused, paused
        # and the run's green "succeeded" next to "paused" (Flower: SUCCESS) is explained
        assert "last run's job" in paused and "Flower, which shows Celery's view" \
            in paused, paused
        assert "Last error" not in done and "flash bad" not in done, done
        # and the retried job's page shows the last run as the previous one, not current
        html = client.get(f"/ui/jobs/{job}").text
        current, previous = html.split('id="previous-run"', 1)
        assert "w9@host:1" not in current and "the last run&#39;s error" not in current
        assert "w9@host:1" in previous and "the last run&#39;s error" in previous
        assert "bad-text" not in html
        # and a cancelled job says why Flower may show it otherwise (RECEIVED)
        cancelled = _submit(status="queued")
        operator.cancel(uuid.UUID(cancelled), actor="test", reason="not needed")
        assert "stay RECEIVED there" in client.get(f"/ui/jobs/{cancelled}").text


def test_the_404_page_keeps_the_navigation_and_covers_unknown_paths(
        app: Any, tokens: dict[str, str]) -> None:
    """Drill D12: the 404 page had no navigation and offered "Log in" to a logged-in
    operator; an unknown /ui path answered the API's raw JSON."""
    with _client(app) as client:
        _login(client, tokens["read"])
        for path in (f"/ui/jobs/{uuid.uuid4()}", "/ui/no-such-page", "/ui/jobs/x/y/z"):
            r = client.get(path)
            assert r.status_code == 404, path
            assert r.headers["content-type"].startswith("text/html"), (path, r.text[:200])
            assert '<nav>' in r.text and 'href="/ui/migrations"' in r.text, path
            assert 'href="/ui/login"' not in r.text, path
    # and without a session: the same page, offering to log in
    with _client(app) as client:
        r = client.get("/ui/no-such-page")
        assert r.status_code == 404 and 'href="/ui/login"' in r.text and "<nav>" not in r.text
