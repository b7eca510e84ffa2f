"""Review: a job past its hard time limit must end `failed` with `time_limit`, once.

Billiard calls the timeout callback (Request.on_timeout -> JobTask.on_failure ->
jobstore.fail_if_owner_dead) BEFORE it kills the pool child (billiard/pool.py
TimeoutHandler.on_hard_timeout: job.handle_timeout(soft=False), then _trywaitkill). So the
main process waits 5 s for a death that only comes after it gives up, records nothing, and
the job is left `running`: its lease lapses, the relay sends it again, and it runs again on
every attempt of its budget (each up to the hard limit), ending `dead`/`worker_lost`.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow

REVIEW_MODULES = '["tests.support.tasks", "tests.support.review_tasks"]'



def _starts(iso: Isolated, job_id: str) -> int:
    return iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", job_id)


def test_a_job_past_its_hard_time_limit_fails_once_with_time_limit(
    services: Services, iso: Isolated
) -> None:
    # given a worker with a 4 s hard limit (2 s soft) and a job the soft limit cannot stop
    env = {**iso.env, "WARDEN_EXTRA_TASK_MODULES": REVIEW_MODULES,
           "WARDEN_TASK_TIME_LIMIT": "4", "WARDEN_TASK_SOFT_TIME_LIMIT": "2"}
    worker = start_worker(services, "hardlimit", concurrency=1, env=env)
    try:
        job_id = iso.insert_job("review.stubborn", {"seconds": 60})
        # when the hard limit kills its pool process
        deadline = time.monotonic() + 40
        row = iso.job(job_id)
        while row["status"] not in {"failed", "dead", "succeeded"} and time.monotonic() < deadline:
            time.sleep(0.2)
            row = iso.job(job_id)
        # then the job is failed with time_limit after one run (an operator decides)
        assert (row["status"], row["error_code"]) == ("failed", "time_limit"), (
            {k: row[k] for k in ("status", "error_code", "error_message", "attempts")},
            _starts(iso, job_id))
        assert _starts(iso, job_id) == 1
    finally:
        worker.stop()
