"""Review: a job whose type was removed while a run of it was in flight must not stay
`running` for ever.

An unknown type ends `failed`/`unknown_job_type` (workers/app.py _unknown_task) only when
the row is queued or retrying. A run of the type that dies in the deploy that removes the
type (a SIGKILL past the stop timeout, a lost node) leaves the row `running` with a lapsed
lease: the relay re-sends it every WARDEN_RELAY_LOST_AFTER, every worker drops the message
(it does not know the type), and the job stays `running` for ever, invisible to the
operator's retry (only failed or dead jobs can be retried).
"""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow


def test_a_lapsed_run_of_an_unknown_type_ends_failed_and_retryable(
    services: Services, iso: Isolated
) -> None:
    # given a job of a type this deploy does not know, left running by a worker that died
    # on another machine a minute ago (its lease lapsed)
    job_id = iso.insert_job(
        "testing.added_later", {"n": 1}, status="running", attempts=1, epoch=1,
        owner="old-node:0123456789abcdef:4026531836:4242:1000:0a0b0c0d0e0f",
        worker="old-node:4242")
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        conn.execute("UPDATE job_runs SET lease_expires_at = now() - interval '1 minute', "
                     "started_at = now() - interval '2 minutes', "
                     "published_at = now() - interval '2 minutes', "
                     "delivered_at = now() - interval '2 minutes' WHERE id = %s", (job_id,))
    # when a worker of the new deploy runs (its relay re-sends the lapsed job)
    worker = start_worker(services, "newdeploy", concurrency=1, env=iso.env)
    try:
        # then the job ends failed with unknown_job_type, which an operator can retry
        done = iso.wait(job_id, {"failed", "dead", "succeeded"}, timeout=30)
        assert (done["status"], done["error_code"]) == ("failed", "unknown_job_type"), done
        assert done["lease_expires_at"] is None
    finally:
        worker.stop()
