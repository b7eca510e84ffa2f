"""A degraded health report reaches a webhook through real worker processes, also when
the receiver fails the first two deliveries: each attempt recorded, retried by the job
core with backoff, one key for the receiver to dedupe on. And the reports over the API."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Proc, Services, start_api, start_worker, wait_for_status
from tests.integration.test_audit_helpers import (
    Isolated,
    add_character,
    constraints_off,
    isolated,
    warden,
    wipe,
)

pytestmark = pytest.mark.slow


@dataclass
class Receiver:
    """A webhook that answers 500 to its first `fail_first` POSTs, then 200; it keeps every
    request and dedupes alerts by their Idempotency-Key, as a real receiver would."""

    fail_first: int = 2
    requests: list[dict[str, Any]] = field(default_factory=list)
    alerts: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            self.requests.append({"headers": headers, "body": json.loads(body)})
            if len(self.requests) <= self.fail_first:
                return 500
            self.alerts.setdefault(headers.get("idempotency-key", ""), json.loads(body))
            return 200


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, str]]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            code = state.handle({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b"ok" if code == 200 else b"try later")

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{server.server_address[1]}/hooks/warden?token=s3cret"
    server.shutdown()


@pytest.fixture(scope="module")
def iso(services: Services) -> Iterator[Isolated]:
    with isolated(services) as found:
        yield found


@pytest.fixture(scope="module")
def node(services: Services, iso: Isolated, receiver: tuple[Receiver, str]) -> Iterator[Proc]:
    proc = start_worker(services, "alerts",
                        env=iso.overrides(WARDEN_ALERT_WEBHOOK_URL=receiver[1]))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api(services: Services, iso: Isolated) -> Iterator[str]:
    proc, url = start_api(services, env=iso.overrides())
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def tokens(iso: Isolated) -> dict[str, str]:
    """Tokens in the isolated database (the API there checks against it)."""
    return {"read": iso.token("read"), "enqueue": iso.token("enqueue", "read")}


@pytest.fixture
def conn(iso: Isolated) -> Iterator[psycopg.Connection[Any]]:
    with iso.connect() as c:
        wipe(c)
        yield c


def test_a_degraded_report_reaches_the_webhook_after_two_failed_deliveries(
        conn: psycopg.Connection[Any], iso: Isolated, node: Proc,
        receiver: tuple[Receiver, str], api: str, tokens: dict[str, str]) -> None:
    state, _ = receiver
    # given three integrity findings: 100 - 15 = 85, degraded
    with constraints_off(conn):
        for _ in range(3):
            add_character(conn, xp=-1)
    # when the report runs with alerts on
    out = warden(iso, "report", "--alert", "--json")
    # then it says degraded (exit 1) with DOMAIN.md's score
    assert out.returncode == 1, out.stderr
    printed = json.loads(out.stdout)
    assert (printed["health_score"], printed["status"]) == (85, "degraded")
    report_id, alert_job = conn.execute(
        "SELECT id, alert_job_id::text FROM health_reports").fetchone() or (None, None)
    assert alert_job is not None
    # and its alert job, refused twice by the receiver, succeeds on its third attempt
    done = wait_for_status(alert_job, {"succeeded", "failed", "dead"}, timeout=60)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 3
    # every attempt is recorded, with what the receiver answered (and no secret in it)
    attempts = conn.execute(
        "SELECT attempt, ok, status_code, target FROM health_alert_deliveries "
        "WHERE report_id = %s ORDER BY id", (report_id,)).fetchall()
    assert [a[:3] for a in attempts] == [(1, False, 500), (2, False, 500), (3, True, 200)]
    assert {a[3] for a in attempts} == {receiver[1].split("/")[2]}
    # the receiver got the same alert three times under one key, and kept it once
    keys = {r["headers"]["idempotency-key"] for r in state.requests}
    assert keys == {f"warden-health-report-{report_id}"} and len(state.requests) == 3
    assert list(state.alerts) == [f"warden-health-report-{report_id}"]
    alert = state.alerts[f"warden-health-report-{report_id}"]
    assert alert["kind"] == "health_degraded" and alert["report"] == printed
    stored = conn.execute("SELECT alert_state FROM health_reports WHERE id = %s",
                          (report_id,)).fetchone()
    assert stored == ("delivered",)
    # and the API shows the report, its history and its deliveries
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {tokens['read']}"}) as c:
        overview = c.get("/v1/reports/health").json()
        one = c.get(f"/v1/reports/health/{report_id}").json()
    assert overview["latest"]["id"] == report_id
    assert overview["latest"]["report"] == printed
    assert [r["id"] for r in overview["history"]["items"]] == [report_id]
    assert [(d["attempt"], d["ok"]) for d in one["deliveries"]] == [(1, False), (2, False),
                                                                   (3, True)]


def test_healthy_or_unasked_reports_send_nothing(
        conn: psycopg.Connection[Any], iso: Isolated, node: Proc,
        receiver: tuple[Receiver, str]) -> None:
    state, _ = receiver
    before = len(state.requests)
    # a healthy report: exit 0, nothing sent
    healthy = warden(iso, "report")
    assert healthy.returncode == 0, healthy.stderr
    assert "score 100 (healthy)" in healthy.stdout
    # a degraded one without --alert: exit 1, nothing sent, and it says so
    with constraints_off(conn):
        add_character(conn, xp=-1, strength=0)  # two findings: 90, still healthy
        add_character(conn, age=-1)  # a third: 85
    quiet = warden(iso, "report", "--period", "6")
    assert quiet.returncode == 1
    assert "alert: not_requested" in quiet.stdout and "last 6 h" in quiet.stdout
    time.sleep(2)
    assert len(state.requests) == before
    # bad input: one error line, exit 2
    bad = warden(iso, "report", "--period", "0")
    assert bad.returncode == 2
