"""The claim's answers with real worker processes, on whichever PostgreSQL the suite runs on
(CI runs it on the machine's 15 and the embedded 18: review N1 broke each of these on 15).

Production lease and relay settings (15 s, 60 s): a takeover that waits for the relay's
backstop instead of the claim is slower than these tests allow.
"""

from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest

from tests.conftest import Isolated, Services, start_worker
from workers.app import app

pytestmark = pytest.mark.slow
PRODUCTION = {"WARDEN_LEASE_TTL": "15", "WARDEN_RELAY_LOST_AFTER": "60"}


def _start_pid(iso: Isolated, job_id: str, n: int = 1, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", job_id) < n:
        assert time.monotonic() < deadline, iso.job(job_id)
        time.sleep(0.05)
    return iso.count("SELECT pid FROM test_starts WHERE job_id = %s ORDER BY id DESC LIMIT 1",
                     job_id)


def test_a_duplicate_of_a_succeeded_job_is_acked_as_done(services: Services,
                                                         iso: Isolated) -> None:
    worker = start_worker(services, "dup", concurrency=1, env={**iso.env, **PRODUCTION})
    try:
        # given a job that succeeded
        job_id = iso.insert_job("testing.sleep_effect", {"seconds": 0})
        iso.wait(job_id, {"succeeded"}, timeout=30)
        # when its message is delivered again
        from kombu import Connection

        with Connection(iso.redis_url) as broker:
            app.send_task("testing.sleep_effect", kwargs={"params": {"seconds": 0}},
                          task_id=job_id, connection=broker)
        deadline = time.monotonic() + 20
        while "job.duplicate_delivery_skipped" not in worker.tail(200_000):
            assert time.monotonic() < deadline, worker.tail(20_000)
            time.sleep(0.1)
        # then it was recognised as done: no error, no second run
        assert "claim_error" not in worker.tail(200_000)
        assert iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", job_id) == 1
    finally:
        worker.stop()


def test_a_sigkilled_run_is_taken_over_within_the_lease(services: Services,
                                                        iso: Isolated) -> None:
    worker = start_worker(services, "kill", concurrency=1, env={**iso.env, **PRODUCTION})
    try:
        job_id = iso.insert_job("testing.sleep_effect", {"seconds": 2})
        pid = _start_pid(iso, job_id)
        # when the process running it is SIGKILLed (its lease has 15 s left)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        # then the redelivered message takes it over at once (its owner is proven dead)
        done = iso.wait(job_id, {"succeeded", "failed", "dead"}, timeout=40)
        took = time.monotonic() - killed_at
        assert (done["status"], done["attempts"]) == ("succeeded", 2), done
        assert took < 15, f"took {took:.1f}s: waited for the lease, not the proof"
        assert iso.count("SELECT count(*) FROM test_effects WHERE job_id = %s", job_id) == 1
    finally:
        worker.stop()


def test_a_run_killed_on_its_last_attempt_ends_dead_within_a_minute(
        services: Services, iso: Isolated) -> None:
    worker = start_worker(services, "last", concurrency=1, env={**iso.env, **PRODUCTION})
    try:
        job_id = iso.insert_job("testing.sleep_effect", {"seconds": 30}, max_attempts=1)
        pid = _start_pid(iso, job_id)
        os.kill(pid, signal.SIGKILL)
        # then it ends dead (worker_lost), visible and retryable, not `running` for ever
        done = iso.wait(job_id, {"succeeded", "failed", "dead"}, timeout=60)
        assert (done["status"], done["error_code"]) == ("dead", "worker_lost"), done
        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM test_effects WHERE job_id = %s",
                               (job_id,)).fetchone()
        assert row == (0,)
    finally:
        worker.stop()
