"""Review: the hard-time-limit outcome must be recorded across a database outage.

Issue 5, scenario 1 names "the hard-time-limit record in the worker's main process" among
the outcome writes a database restart must not lose. jobstore.fail_if_owner_dead made one
try: a database that is restarting (or refusing connections) when the hard limit kills the
pool child raised at once, `_record_time_limit` logged it, and the job was left `running`.
Its lease lapsed, the relay sent it again, and the job ran again to its hard limit (an
attempt spent, up to the budget), instead of ending `failed`/`time_limit` after one run.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow

REVIEW_MODULES = '["tests.support.tasks", "tests.support.review_tasks"]'


def _starts(iso: Isolated, job_id: str) -> int:
    return iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", job_id)


def _admin(iso: Isolated) -> tuple[str, str]:
    base, name = iso.database_url.rsplit("/", 1)
    return f"{base}/postgres", name


def test_a_hard_time_limit_during_a_database_outage_is_recorded_once_it_is_back(
    services: Services, iso: Isolated
) -> None:
    # given a worker with a 4 s hard limit (2 s soft), a job the soft limit cannot stop, and
    # a relay that would re-send a lapsed job only after a minute
    env = {**iso.env, "WARDEN_EXTRA_TASK_MODULES": REVIEW_MODULES,
           "WARDEN_TASK_TIME_LIMIT": "4", "WARDEN_TASK_SOFT_TIME_LIMIT": "2",
           "WARDEN_RELAY_LOST_AFTER": "60"}
    worker = start_worker(services, "hardlimitdb", concurrency=1, env=env)
    admin, name = _admin(iso)
    blocked = False
    try:
        job_id = iso.insert_job("review.stubborn", {"seconds": 60})
        deadline = time.monotonic() + 30
        while _starts(iso, job_id) == 0:
            assert time.monotonic() < deadline, iso.job(job_id)
            time.sleep(0.05)
        started = time.monotonic()
        time.sleep(2.5)
        # when the database refuses every connection of the platform from just before the
        # hard limit until 5 s after it (a restart)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            blocked = True
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        time.sleep(max(0.0, started + 9 - time.monotonic()))
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            blocked = False
        # then, once it is back, the job is failed with time_limit after its one run
        row = iso.wait(job_id, {"failed", "dead", "succeeded"}, timeout=30)
        assert (row["status"], row["error_code"]) == ("failed", "time_limit"), (
            {k: row[k] for k in ("status", "error_code", "error_message", "attempts")})
        assert _starts(iso, job_id) == 1
    finally:
        if blocked:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        worker.stop()
