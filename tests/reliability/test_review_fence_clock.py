"""Review: a long fenced step must not hand a healthy job to another worker.

FENCE_SQL (workers/jobstore.py) sets `lease_expires_at = now() + ttl` inside the family's
transaction, and Postgres's now() is the time the TRANSACTION began. A step that runs
longer than the lease (a big batch, a slow report query) commits a lease that already lies
in the past, overwriting the heartbeat's fresh one. Until the next heartbeat (TTL/3 later)
the row looks abandoned: the relay's _LAPSED pass re-sends it and another worker claims it
with a new epoch. The healthy run is fenced off at its next step and the job starts over.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow

REVIEW_MODULES = '["tests.support.tasks", "tests.support.review_tasks"]'



def test_a_step_longer_than_the_lease_keeps_its_job(services: Services, iso: Isolated) -> None:
    # given a worker with a free second process, and a healthy job whose first fenced step
    # takes 13 s (lease 6 s, heartbeat every 2 s)
    env = {**iso.env, "WARDEN_EXTRA_TASK_MODULES": REVIEW_MODULES, "WARDEN_LEASE_TTL": "6"}
    worker = start_worker(services, "fenceclock", concurrency=2, env=env)
    try:
        job_id = iso.insert_job("review.long_step", {"seconds": 13})
        # when it runs to the end (watching its lease meanwhile)
        lapsed_seen = []
        deadline = time.monotonic() + 90
        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT status, epoch, lease_expires_at < now() FROM job_runs "
                    "WHERE id = %s", (job_id,)).fetchone()
                assert row is not None
                if row[0] != "running" and row[0] in {"succeeded", "failed", "dead"}:
                    break
                if row[0] == "running" and row[1] == 1 and row[2]:
                    lapsed_seen.append(time.monotonic())
                time.sleep(0.05)
        done = iso.job(job_id)
        # then its lease never lay in the past while it ran, it kept its epoch and ran
        # once, and each of its two steps committed once
        starts = iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", job_id)
        effects = iso.count("SELECT count(*) FROM test_effects WHERE job_id = %s", job_id)
        assert (done["status"], done["epoch"], starts, effects, len(lapsed_seen)) == (
            "succeeded", 1, 1, 2, 0), (done["status"], done["epoch"], starts, effects,
                                       len(lapsed_seen))
    finally:
        worker.stop()
