"""Singleton job types never overlap; a job not started before it expires never runs."""

from __future__ import annotations

import pytest

from tests.conftest import Proc, wait_for_status
from workers.enqueue import submit

pytestmark = pytest.mark.slow


def test_singleton_jobs_of_a_type_run_one_at_a_time(worker: Proc) -> None:
    # given a worker with two processes and two jobs of a singleton type
    ids = [str(submit("testing.singleton_sleep", {"seconds": 1.5}).job["id"]) for _ in range(2)]
    # when both have run
    runs = [wait_for_status(i, {"succeeded"}, timeout=60) for i in ids]
    # then one started after the other ended, and neither spent an extra attempt waiting
    (a, b) = sorted((r["result"] for r in runs), key=lambda r: r["started"])  # type: ignore[index, return-value]
    assert b["started"] >= a["ended"]
    assert [r["attempts"] for r in runs] == [1, 1]


def test_expired_job_is_cancelled_not_run(worker: Proc) -> None:
    # given a job that may only start within 1 s, delayed by 2 s
    job_id = str(submit("platform.ping", {"echo": "late"}, countdown=2, expires=1).job["id"])
    # when the worker receives it after its expiry
    job = wait_for_status(job_id, {"cancelled", "succeeded"}, timeout=30)
    # then it is cancelled with code expired, without an attempt or a result
    assert (job["status"], job["error_code"], job["attempts"]) == ("cancelled", "expired", 0)
    assert job["result"] is None
