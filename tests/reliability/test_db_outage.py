"""A healthy run across a database outage longer than its lease (issue 13, review N5).

A failover or a restart takes the database away for ~20-30 s: every heartbeat fails and the
lease lapses while the run goes on. When the database is back, the run must still be the
job's owner: its heartbeat renews the lease at once, the relay does not re-send a lapsed
job whose owner is not proven dead before WARDEN_RELAY_LOST_AFTER, and the job ends
succeeded on the same attempt (here its last: no takeover may declare it dead).
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow


def _admin_url(database_url: str) -> tuple[str, str]:
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(path="/postgres")), parts.path.lstrip("/")


def database_outage(database_url: str, seconds: float) -> None:
    """The database refuses every connection for `seconds`, and every session it had is
    cut (as a restart or a failover does), on any PostgreSQL and without touching others."""
    admin, name = _admin_url(database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            time.sleep(seconds)
        finally:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def test_a_run_rides_out_a_25_second_outage_on_its_last_attempt(
        services: Services, iso: Isolated) -> None:
    # given a worker with a free process (to take the job over, were it re-sent), a 5 s
    # lease and the production WARDEN_RELAY_LOST_AFTER, running a job on its last attempt
    # that has been running for a while (published minutes ago)
    worker = start_worker(services, "outage", concurrency=2, env={
        **iso.env, "WARDEN_LEASE_TTL": "5", "WARDEN_RELAY_LOST_AFTER": "60"})
    try:
        job_id = iso.insert_job("testing.sleep_effect", {"seconds": 35}, max_attempts=1)
        deadline = time.monotonic() + 30
        while iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", job_id) < 1:
            assert time.monotonic() < deadline, iso.job(job_id)
            time.sleep(0.1)
        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            conn.execute("UPDATE job_runs SET published_at = now() - interval '5 minutes' "
                         "WHERE id = %s", (job_id,))
        # when the database is away for 25 s while it runs (five leases)
        database_outage(iso.database_url, 25)
        # then it ends succeeded, on the same attempt and epoch, its effect applied once
        done = iso.wait(job_id, {"succeeded", "failed", "dead"}, timeout=60)
        assert (done["status"], done["attempts"], done["epoch"]) == ("succeeded", 1, 1), (
            done, worker.tail(20_000))
        assert iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", job_id) == 1
        assert iso.count("SELECT count(*) FROM test_effects WHERE job_id = %s", job_id) == 1
        assert "job.taken_over" not in worker.tail(500_000)
    finally:
        worker.stop()
