"""Delivery guarantees with real worker processes: once, despite duplicates and crashes."""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import psycopg
import pytest
import redis
from kombu import Connection

from tests.conftest import Proc, Services, start_worker, wait_for_status
from workers.app import app

pytestmark = pytest.mark.slow


def _starts(db: psycopg.Connection, job_id: str) -> int:
    row = db.execute("SELECT count(*) FROM test_starts WHERE job_id=%s", (job_id,)).fetchone()
    assert row is not None
    return int(row[0])


def _effects(db: psycopg.Connection, job_id: str) -> int:
    row = db.execute("SELECT count(*) FROM test_effects WHERE job_id=%s", (job_id,)).fetchone()
    assert row is not None
    return int(row[0])


def _wait_for_start(db: psycopg.Connection, job_id: str) -> None:
    """Until the task body has begun (its start row is committed), so a kill hits mid-job."""
    deadline = time.monotonic() + 10
    while _starts(db, job_id) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)


def _assert_second_run_succeeded_effect_once(db: psycopg.Connection, job_id: str) -> None:
    done = wait_for_status(job_id, {"succeeded", "failed", "dead"}, timeout=60)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2  # the killed run spent one attempt
    assert _starts(db, job_id) == 2  # it really ran twice
    assert _effects(db, job_id) == 1  # and its effect happened once


def test_duplicate_key_and_duplicate_message_run_once(
    client: httpx.Client, worker: Proc, db: psycopg.Connection
) -> None:
    # given a job enqueued twice with the same idempotency key
    key = f"dup-{uuid.uuid4()}"
    body = {"type": "testing.sleep_effect", "params": {"seconds": 0.5}, "idempotency_key": key}
    first = client.post("/v1/jobs", json=body)
    second = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert (first.status_code, second.status_code) == (202, 200)
    job_id = first.json()["id"]
    assert second.json()["id"] == job_id
    # and its message delivered a second time (as a redelivery or a relay re-publish would)
    app.send_task("testing.sleep_effect", kwargs={"params": {"seconds": 0.5}}, task_id=job_id)
    # when the worker has processed both messages
    wait_for_status(job_id, {"succeeded"})
    time.sleep(4)  # the duplicate waits out the lease (3 s in tests) before it looks again
    # then the job ran once: one start, one effect, one attempt
    assert _starts(db, job_id) == 1
    assert _effects(db, job_id) == 1
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["attempts"]) == ("succeeded", 1)


def test_sigkill_mid_job_redelivers_and_succeeds_once(
    services: Services, client: httpx.Client, db: psycopg.Connection
) -> None:
    # given a dedicated worker running a 4-second job
    proc = start_worker(services, "kill", concurrency=1)
    try:
        r = client.post("/v1/jobs", json={"type": "testing.sleep_effect",
                                           "params": {"seconds": 4}})
        job_id = r.json()["id"]
        wait_for_status(job_id, {"running"}, timeout=20)
        _wait_for_start(db, job_id)
        # when the process executing it is SIGKILLed mid-job
        row = db.execute("SELECT pid FROM test_starts WHERE job_id=%s", (job_id,)).fetchone()
        assert row is not None
        os.kill(row[0], signal.SIGKILL)
        # then the job is delivered again and succeeds, with its effect applied once
        _assert_second_run_succeeded_effect_once(db, job_id)
    finally:
        proc.stop()


def test_transient_errors_end_dead_and_operator_retry_brings_it_back(
    client: httpx.Client, worker: Proc, tokens: dict[str, str], rds: redis.Redis,
    db: psycopg.Connection,
) -> None:
    # given a job whose dependency is down on every attempt (budget: 3)
    job_id = client.post("/v1/jobs", json={"type": "testing.flaky"}).json()["id"]
    # when it has used its budget
    dead = wait_for_status(job_id, {"dead", "succeeded", "failed"}, timeout=60)
    # then it is dead, with the error and every attempt visible
    assert dead["status"] == "dead"
    assert dead["attempts"] == 3
    assert dead["error_code"] == "transient:TransientError"
    assert _starts(db, job_id) == 3
    listed = client.get("/v1/jobs", params={"status": "dead", "type": "testing.flaky"}).json()
    assert job_id in [j["id"] for j in listed["items"]]
    # when the cause is fixed and an operator retries it
    rds.set(f"testing:fixed:{job_id}", "1")
    r = client.post(f"/v1/jobs/{job_id}/retry", json={"reason": "dependency fixed"},
                    headers={"Authorization": f"Bearer {tokens['admin']}"})
    assert r.status_code == 200, r.text
    # (the answer is the row as it stands: a worker may have taken it already)
    assert (r.json()["status"] in {"queued", "running", "succeeded"}, r.json()["attempts"],
            r.json()["manual_retries"]) == (True, 0 if r.json()["status"] == "queued" else 1, 1)
    # then it runs again and succeeds
    done = wait_for_status(job_id, {"succeeded", "dead"}, timeout=30)
    assert done["status"] == "succeeded"
    assert done["manual_retries"] == 1
    assert done["result"] == {"fixed": "yes"}


def test_whole_worker_killed_job_comes_back_after_visibility_timeout(
    services: Services, client: httpx.Client, db: psycopg.Connection
) -> None:
    # given a worker whose Redis visibility timeout is 12 s (hard limit 10 s), with broker
    # keys of its own so that no other test's worker can take its job, running a job
    prefix = f"killtest-{uuid.uuid4().hex[:8]}:"
    env = {"WARDEN_TASK_TIME_LIMIT": "10", "WARDEN_TASK_SOFT_TIME_LIMIT": "8",
           "WARDEN_VISIBILITY_TIMEOUT": "12", "WARDEN_BROKER_KEY_PREFIX": prefix}
    proc = start_worker(services, "node", concurrency=1, env=env)
    replacement: Proc | None = None
    try:
        job_id = str(uuid.uuid4())
        db.execute("INSERT INTO job_runs (id, type, params, published_at) VALUES "
                   "(%s, 'testing.sleep_effect', '{\"seconds\": 4}', now())", (job_id,))
        options = dict(app.conf.broker_transport_options, global_keyprefix=prefix)
        with Connection(services.redis_url, transport_options=options) as conn:
            app.send_task("testing.sleep_effect", kwargs={"params": {"seconds": 4}},
                          task_id=job_id, connection=conn)
        wait_for_status(job_id, {"running"}, timeout=20)
        _wait_for_start(db, job_id)
        # when the whole worker (main process and pool) is SIGKILLed, as when a node dies
        os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(13)  # past the visibility timeout: the unacked message may be restored
        replacement = start_worker(services, "node-again", concurrency=1, env=env)
        # then the message is restored, the orphaned run is reclaimed, the effect applied once
        _assert_second_run_succeeded_effect_once(db, job_id)
    finally:
        proc.stop()
        if replacement is not None:
            replacement.stop()


def test_message_lost_after_publish_is_sent_again_by_the_relay(
    client: httpx.Client, worker: Proc, db: psycopg.Connection, api: str
) -> None:
    # given a job recorded as published whose message never reached a worker (Redis lost it)
    job_id = str(uuid.uuid4())
    db.execute("INSERT INTO job_runs (id, type, params, status, published_at, created_at) "
               "VALUES (%s, 'platform.ping', '{\"echo\": \"lost\"}', 'queued', "
               "now() - interval '1 minute', now() - interval '1 minute')", (job_id,))
    # when the relay's backstop period (5 s in tests) has passed
    # then the job is published again and runs, once
    done = wait_for_status(job_id, {"succeeded"}, timeout=30)
    assert done["attempts"] == 1
    assert done["result"] == {"echo": "lost", "job_id": job_id}


def test_a_singleton_waits_as_long_as_it_takes(worker: Proc) -> None:
    # given a long singleton job, and a second one that must wait for it through more
    # re-deliveries than Celery's default retry cap (3)
    from workers.enqueue import submit

    first = str(submit("testing.singleton_sleep", {"seconds": 16}).job["id"])
    wait_for_status(first, {"running"})
    second = str(submit("testing.singleton_sleep", {"seconds": 0}).job["id"])
    # then the second still runs once the first is done, without spending attempts waiting
    done = wait_for_status(second, {"succeeded"}, timeout=60)
    assert done["attempts"] == 1
