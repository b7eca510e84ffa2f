"""Review: a retry runs when it is due, not whenever a stray copy of its message arrives.

The claim (workers/jobstore.py _CLAIMABLE) takes a `retrying` (or `queued` with not_before)
row whatever its next_attempt_at. Copies of a job's message are normal here (ADR 0007: "a
duplicate is a no-op"): kombu puts a running job's unacked message back in the queue when
the worker's broker connection drops (now that running jobs are no longer cancelled), a
SIGKILLed pool process's message is requeued, a visibility-timeout restore comes back. If
the copy is consumed after the run recorded `retrying`, it claims the job at once: the
backoff is skipped and an attempt spent, and a few copies turn one transient error into
`dead` within a second.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow

REVIEW_MODULES = '["tests.support.tasks", "tests.support.review_tasks"]'



def _starts(iso: Isolated, job_id: str) -> int:
    return iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", job_id)


def test_stray_copies_of_a_message_do_not_spend_a_retrying_jobs_budget(
    services: Services, iso: Isolated
) -> None:
    # given a job that failed transiently once and waits 10-20 s for its retry
    from kombu import Connection

    from workers.app import app

    env = {**iso.env, "WARDEN_EXTRA_TASK_MODULES": REVIEW_MODULES,
           "WARDEN_RETRY_BACKOFF_BASE": "20", "WARDEN_RETRY_BACKOFF_MAX": "60"}
    worker = start_worker(services, "copies", concurrency=1, env=env)
    try:
        job_id = iso.insert_job("review.slow_flaky", {"seconds": 0})
        assert iso.wait(job_id, {"retrying", "dead"}, timeout=30)["status"] == "retrying"
        # when two stray copies of its first message arrive (a requeue after a lost pool
        # process, a restore after a connection loss, a visibility-timeout restore)
        with Connection(iso.redis_url) as broker:
            for _ in range(2):
                app.send_task("review.slow_flaky", kwargs={"params": {"seconds": 0}},
                              task_id=job_id, connection=broker)
        time.sleep(4)
        # then the job still waits for its retry, with its budget intact
        row = iso.job(job_id)
        assert (row["status"], row["attempts"], _starts(iso, job_id)) == ("retrying", 1, 1), (
            {k: row[k] for k in ("status", "attempts", "error_code")}, _starts(iso, job_id))
    finally:
        worker.stop()
