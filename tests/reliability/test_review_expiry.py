"""Review: `expires` means "not started by then", never "cancelled after it started".

The claim (workers/jobstore.py _EXPIRED) cancelled any job that was not `running` when a
copy of its message came after expires_at: also a job that had started and waits for its
retry, and a fanned-out parent that comes back (queued) to add its children up. Beat gives
every entry an `expires` (validation-incremental: 15 min, and it fans out): a sweep whose
chunks took longer than that ended `cancelled`/`expired` ("not started before expires_at")
after its children had done all the work, its totals never recorded; a nightly job whose
transient error came late in its window was cancelled half done.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
import redis

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow


def _starts(iso: Isolated, job_id: str) -> int:
    return iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", job_id)


def test_a_parent_whose_children_outlast_its_expiry_still_adds_them_up(
    services: Services, iso: Isolated
) -> None:
    # given a worker, and a parent that must START within 5 s and fans out 2 chunks of 8 s
    worker = start_worker(services, "fanexp", concurrency=2, env=iso.env)
    try:
        parent = iso.insert_job("testing.fan_parent", {"chunks": 2, "seconds": 8},
                                expires_at=datetime.now(UTC) + timedelta(seconds=5))
        # when it started in time, and its children end after expires_at
        done = iso.wait(parent, {"succeeded", "failed", "dead", "cancelled"}, timeout=60)
        # then it comes back and records their totals
        assert (done["status"], done["error_code"]) == ("succeeded", None), (
            {k: done[k] for k in ("status", "error_code", "error_message", "attempts")})
        assert done["result"] == {"total": 0 + 1, "statuses": ["succeeded", "succeeded"]}
    finally:
        worker.stop()


def test_a_started_job_whose_retry_is_due_after_its_expiry_still_runs(
    services: Services, iso: Isolated
) -> None:
    # given a worker whose retries wait 5-10 s, and a job that must START within 4 s and
    # fails transiently on its first attempt
    env = {**iso.env, "WARDEN_RETRY_BACKOFF_BASE": "10", "WARDEN_RETRY_BACKOFF_MAX": "10"}
    worker = start_worker(services, "retryexp", concurrency=1, env=env)
    try:
        job_id = iso.insert_job("testing.flaky", {},
                                expires_at=datetime.now(UTC) + timedelta(seconds=4))
        deadline = time.monotonic() + 30
        while _starts(iso, job_id) < 1:
            assert time.monotonic() < deadline, iso.job(job_id)
            time.sleep(0.05)
        assert iso.wait(job_id, {"retrying", "failed", "dead"})["status"] == "retrying"
        # when its dependency is back, and the retry comes after expires_at
        redis.Redis.from_url(iso.redis_url).set(f"testing:fixed:{job_id}", "1")
        done = iso.wait(job_id, {"succeeded", "failed", "dead", "cancelled"}, timeout=60)
        # then the retry runs: the job had started in time
        assert (done["status"], done["attempts"]) == ("succeeded", 2), (
            {k: done[k] for k in ("status", "error_code", "error_message", "attempts")})
        assert _starts(iso, job_id) == 2
    finally:
        worker.stop()
