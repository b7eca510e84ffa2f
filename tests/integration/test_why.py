"""Why is this job not running? Each waiting reason, shown by putting a job in that state
(issue 9, point 3), through the API and `warden job`."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
import redis

from tests.conftest import ROOT, Isolated, Services, isolated, start_api
from workers.liveness import UNREACHABLE_SECONDS
from workers.tokens import hash_token

TOKEN = "wdn_why-test-token-0123456789"


@pytest.fixture(scope="module")
def deployment(services: Services, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[Isolated, str]]:
    """A database and Redis of their own, an API, and no worker (so nothing moves)."""
    with isolated(services, tmp_path_factory.mktemp("why")) as iso:
        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO api_tokens (name, token_hash, scopes) "
                         "VALUES ('why', %s, '{read}')", (hash_token(TOKEN),))
        # Its relay must not move the jobs the tests park (grace and lost-after of an hour).
        api, base = start_api(services, env={**iso.env, "WARDEN_RELAY_GRACE": "3600",
                                             "WARDEN_RELAY_LOST_AFTER": "3600"})
        try:
            yield iso, base
        finally:
            api.stop()


def _why(base: str, job_id: str) -> dict[str, object]:
    r = httpx.get(f"{base}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"},
                  timeout=10)
    assert r.status_code == 200, r.text
    waiting = r.json()["waiting_on"]
    assert isinstance(waiting, dict)
    return waiting


def _job(iso: Isolated, job_type: str, sql_set: str, params: dict[str, object] | None = None
         ) -> str:
    job_id = iso.insert_job(job_type, params or {"seconds": 0})
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        conn.execute(f"UPDATE job_runs SET {sql_set} WHERE id = %s", (job_id,))
    return job_id


def test_countdown_backoff_outbox_and_dead(deployment: tuple[Isolated, str]) -> None:
    iso, base = deployment
    countdown = _job(iso, "testing.sleep_effect",
                     "not_before = now() + interval '10 minutes', published_at = now()")
    assert _why(base, countdown)["reason"] == "countdown"
    backoff = _job(iso, "testing.flaky", "status = 'retrying', attempts = 2, "
                   "next_attempt_at = now() + interval '5 minutes', published_at = now(), "
                   "error_code = 'transient:TransientError'", {})
    why = _why(base, backoff)
    assert why["reason"] == "backoff"
    assert "attempt 2 of 5" in str(why["message"]) and "transient:TransientError" in str(
        why["message"])
    outbox = _job(iso, "testing.sleep_effect", "published_at = NULL")
    assert _why(base, outbox)["reason"] == "outbox"
    dead = _job(iso, "testing.flaky", "status = 'dead', attempts = 3, finished_at = now(), "
                "error_code = 'transient:TransientError', error_message = 'dependency down'", {})
    why = _why(base, dead)
    assert why["reason"] == "dead"
    assert why["message"] == "dead after 3 attempts: transient:TransientError: dependency down"


def test_singleton_held_by_another_job(deployment: tuple[Isolated, str]) -> None:
    iso, base = deployment
    holder = _job(iso, "testing.singleton_sleep", "status = 'running', attempts = 1, "
                  "epoch = 1, lease_expires_at = now() + interval '1 minute', "
                  "started_at = now(), published_at = now(), worker = 'w1:1'")
    waiter = _job(iso, "testing.singleton_sleep", "published_at = now()")
    why = _why(base, waiter)
    assert (why["reason"], why["holder"]) == ("singleton", holder)
    running = _why(base, holder)
    assert running["reason"] == "running" and "w1:1" in str(running["message"])
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        conn.execute("UPDATE job_runs SET status = 'succeeded', finished_at = now() "
                     "WHERE id = %s", (holder,))


def test_no_worker_then_jobs_ahead_in_the_queue(
    services: Services, deployment: tuple[Isolated, str]
) -> None:
    iso, base = deployment
    # given three jobs published before ours, none delivered
    ahead = [_job(iso, "testing.sleep_effect",
                  f"published_at = now() - interval '{10 - n} minutes'") for n in range(3)]
    ours = _job(iso, "testing.sleep_effect", "published_at = now() - interval '1 minute'")
    # when no worker consumes the queue: then that is the reason
    assert _why(base, ours)["reason"] == "no_worker"
    # when a (busy) worker consumes it: then the jobs ahead of ours are counted
    r = redis.Redis.from_url(iso.redis_url)
    r.set("warden:worker:busy@test", json.dumps({"node": "busy@test", "queues": ["warden"],
                                                 "at": time.time()}), ex=30)
    why = _why(base, ours)
    assert (why["reason"], why["ahead"]) == ("queue", 3), (why, ahead)
    # and `warden job` says the same on stderr, the job as JSON on stdout
    out = subprocess.run([sys.executable, "-m", "cli.main", "job", ours], cwd=ROOT,
                         env=services.env(**iso.env), capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["waiting_on"]["reason"] == "queue"
    assert out.stderr.strip() == "3 job(s) ahead of it in queue 'warden', 1 worker(s) consuming"
    r.delete("warden:worker:busy@test")


def test_a_parent_waits_for_its_children(deployment: tuple[Isolated, str]) -> None:
    iso, base = deployment
    parent = _job(iso, "testing.fan_parent", "status = 'waiting', children_total = 4, "
                  "children_pending = 3, published_at = now()", {"chunks": 4})
    why = _why(base, parent)
    assert why["reason"] == "children"
    assert why["message"] == "waiting for 3 of 4 child jobs to end"


class HungRedis:
    """A TCP server that accepts and never answers: Redis hung (a paused server, a half-open
    path), not refusing. Counts the connections made to it."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._held: list[socket.socket] = []
        self.url = f"redis://127.0.0.1:{self._server.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._held.append(conn)

    @property
    def connections(self) -> int:
        return len(self._held)

    def close(self) -> None:
        self._server.close()
        for conn in self._held:
            conn.close()


def test_while_redis_hangs_a_job_and_a_page_of_jobs_answer_at_once(
    services: Services, deployment: tuple[Isolated, str]
) -> None:
    # given an API whose Redis accepts connections and never answers (its relay idle, so
    # only the reads below talk to it), and a page of queued, published jobs
    iso, _ = deployment
    hung = HungRedis()
    api, base = start_api(services, env={**iso.env, "WARDEN_REDIS_URL": hung.url,
                                         "WARDEN_RELAY_INTERVAL": "3600"})
    try:
        jobs = [_job(iso, "testing.sleep_effect", "published_at = now()") for _ in range(25)]
        # when one of them is read
        started = time.monotonic()
        r = httpx.get(f"{base}/v1/jobs/{jobs[-1]}", timeout=60,
                      headers={"Authorization": f"Bearer {TOKEN}"})
        took = time.monotonic() - started
        # then it answers well inside Redis's 5 s socket timeout, saying what it cannot tell
        assert r.status_code == 200, r.text
        why = r.json()["waiting_on"]
        assert why["reason"] == "queue", why
        assert why["message"].endswith("Redis unreachable: cannot tell which workers consume")
        assert took < 2, took
        # when an operator opens the jobs page (after the remembered failure has lapsed)
        with httpx.Client(base_url=base, timeout=60, follow_redirects=False) as ui:
            form = ui.get("/ui/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
            assert csrf is not None, form.text[:500]
            login = ui.post("/ui/login", data={"token": TOKEN, "csrf": csrf.group(1)})
            assert login.status_code == 303, login.text
            time.sleep(UNREACHABLE_SECONDS + 0.5)
            asked = hung.connections
            started = time.monotonic()
            page = ui.get("/ui/jobs", params={"status": "queued"})
            took = time.monotonic() - started
        # then its 25 queued jobs say so, Redis was asked once for all of them, and the page
        # took about one short wait, not 25 socket timeouts
        assert page.status_code == 200, page.text[:500]
        assert page.text.count("Redis unreachable: cannot tell which workers consume") == 25
        assert hung.connections - asked <= 1
        assert took < 2, took
        # and liveness never waits behind it
        assert httpx.get(f"{base}/healthz", timeout=5).json() == {"status": "ok"}
    finally:
        api.stop()
        hung.close()


def test_a_running_job_whose_lease_lapsed_says_when_it_may_be_taken_over(
        services: Services) -> None:
    # given a running job whose owner stopped renewing its lease 10 s ago (an outage, a stall)
    from datetime import UTC, datetime, timedelta

    from workers import why

    lapsed = datetime.now(UTC) - timedelta(seconds=10)
    row = {"status": "running", "worker": "host-b:1", "started_at": lapsed,
           "lease_expires_at": lapsed, "progress": None, "error_code": None,
           "error_message": None}
    # then "why" says so, and from when a takeover may happen (WARDEN_RELAY_LOST_AFTER)
    said = why.explain(row)["message"]
    assert "its lease lapsed at" in said and "taken over from" in said, said
    # and a live lease says nothing of the kind
    row["lease_expires_at"] = datetime.now(UTC) + timedelta(seconds=10)
    assert "lapsed" not in why.explain(row)["message"]


def test_warden_job_says_the_reason_once(services: Services, deployment: tuple[Isolated, str]
                                         ) -> None:
    """Drill D12: `warden job` printed "failed: failed: ..." and "countdown: countdown: ..."."""
    iso, _ = deployment
    failed = _job(iso, "testing.sleep_effect", "status = 'failed', attempts = 1, "
                  "finished_at = now(), error_code = 'internal_error', error_message = 'boom'")
    countdown = _job(iso, "testing.sleep_effect",
                     "not_before = now() + interval '10 minutes', published_at = now()")
    for job_id, line in ((failed, "failed: internal_error: boom"),
                         (countdown, "countdown: may run from ")):
        out = subprocess.run([sys.executable, "-m", "cli.main", "job", job_id], cwd=ROOT,
                             env=services.env(**iso.env), capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        assert out.stderr.startswith(line), out.stderr
        assert out.stderr.count(line.split(":")[0] + ":") == 1, out.stderr


def test_a_singleton_deferred_behind_another_says_so_not_queue(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Drill D6: after the holder ended, a singleton job a worker had deferred said "0 job(s)
    ahead ..., 1 worker(s) consuming" for ~13 s, as if a worker were stuck."""
    from tests.conftest import start_worker

    with isolated(services, tmp_path_factory.mktemp("why-singleton")) as iso:
        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO api_tokens (name, token_hash, scopes) "
                         "VALUES ('why', %s, '{read}')", (hash_token(TOKEN),))
        # a worker with two processes; a lease long enough to see the deferral
        env = {**iso.env, "WARDEN_LEASE_TTL": "8"}
        worker = start_worker(services, "why-singleton", env=env)
        api, base = start_api(services, env=env)
        try:
            def enqueue(seconds: float) -> str:
                out = subprocess.run(
                    [sys.executable, "-m", "cli.main", "enqueue", "testing.singleton_sleep",
                     "-p", f"seconds={seconds}"], cwd=ROOT, env=services.env(**env),
                    capture_output=True, text=True, timeout=60, check=True)
                return str(json.loads(out.stdout)["id"])

            # given a singleton job running, and a second one of the type taken meanwhile
            holder = enqueue(8)
            iso.wait(holder, {"running"}, timeout=30)
            waiter = enqueue(0)
            seen: list[dict[str, object]] = []
            every: list[tuple[str, str, object]] = []
            deadline = time.monotonic() + 40
            # when its holder has ended while the second waits for its deferral to end
            while time.monotonic() < deadline:
                row = iso.job(waiter)
                if row["status"] != "queued":
                    break
                # (the holder's state read before the answer: one computed while the
                # holder still ran rightly names it)
                holder_done = iso.job(holder)["status"] == "succeeded"
                why = _why(base, waiter)
                row = iso.job(waiter)
                every.append((str(iso.job(holder)["status"]), str(row["status"]), why))
                if (holder_done and row["status"] == "queued" and row["next_attempt_at"]
                        and why["reason"] != "outbox"):
                    seen.append(why)
                time.sleep(0.3)
            iso.wait(waiter, {"succeeded"}, timeout=30)
        finally:
            api.stop()
            worker.stop()
    # then each answer meanwhile said it is deferred, and until when; never "0 jobs ahead"
    assert seen, ("the waiter was never seen deferred after its holder ended", every)
    assert {w["reason"] for w in seen} == {"deferred"}, seen
    assert all("singleton" in str(w["message"]) and w["until"] for w in seen), seen
