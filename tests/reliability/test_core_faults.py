"""The smaller core promises of issue 13, with real worker processes: a database error in a
claim never drops the message, a rolling deploy's new job type waits for a worker that
knows it, and a countdown held by a busy worker is not re-sent as lost.
"""

from __future__ import annotations

import time

import psycopg
import pytest
from kombu import Connection

from tests.conftest import Isolated, Services, start_worker
from workers.app import app
from workers.children import Child

pytestmark = pytest.mark.slow
LATE = '["tests.support.tasks", "tests.support.late_tasks"]'


def _wait_log(child: Child, text: str, timeout: float = 30) -> None:
    """Wait until the child's whole log holds `text` (a traceback can be longer than a tail)."""
    deadline = time.monotonic() + timeout
    while text not in child.tail(10**9):
        assert time.monotonic() < deadline, f"{text!r} not logged:\n" + child.tail()
        time.sleep(0.1)


def test_a_database_error_in_the_claim_sends_the_message_again(services: Services,
                                                               iso: Isolated) -> None:
    # given a job whose claim the database refuses with an error no retry cures (a trigger
    # raising for its row: what a bug or a server lacking a feature looks like)
    job_id = iso.insert_job("testing.sleep_effect", {"seconds": 0})
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        conn.execute("CREATE FUNCTION test_refuse() RETURNS trigger AS $$ BEGIN "
                     f"IF NEW.id = '{job_id}' AND NEW.status = 'running' THEN "
                     "RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$ "
                     "LANGUAGE plpgsql")
        conn.execute("CREATE TRIGGER test_refuse BEFORE UPDATE ON job_runs FOR EACH ROW "
                     "EXECUTE FUNCTION test_refuse()")
    worker = start_worker(services, "claimerr", concurrency=1, env=iso.env)
    try:
        # then the worker logs the error and keeps the message (sent again later)
        _wait_log(worker, "job.claim_error")
        assert iso.job(job_id)["status"] == "queued"
        # and once the database takes the claim, the job runs, once
        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            conn.execute("DROP TRIGGER test_refuse ON job_runs")
        done = iso.wait(job_id, {"succeeded", "failed", "dead"}, timeout=60)
        assert (done["status"], done["attempts"]) == ("succeeded", 1), done
        assert iso.count("SELECT count(*) FROM test_effects WHERE job_id = %s", job_id) == 1
    finally:
        worker.stop()


def test_a_new_type_waits_for_a_worker_that_knows_it(services: Services,
                                                     iso: Isolated) -> None:
    # given only a worker of the old deploy, which does not know the new type, and a grace
    old = start_worker(services, "olddeploy", concurrency=1,
                       env={**iso.env, "WARDEN_UNKNOWN_TYPE_GRACE": "60"})
    new = None
    try:
        job_id = iso.insert_job("testing.added_later", {"n": 7})
        _wait_log(old, "job.unknown_type")
        # then the job is not failed: it waits (deferred) for a worker that knows the type
        assert iso.job(job_id)["status"] == "queued"
        # when the new deploy's worker arrives, it runs it, with no operator involved
        new = start_worker(services, "newdeploy", concurrency=1,
                           env={**iso.env, "WARDEN_EXTRA_TASK_MODULES": LATE})
        old.stop()
        done = iso.wait(job_id, {"succeeded", "failed", "dead"}, timeout=60)
        assert (done["status"], done["result"]) == ("succeeded", {"n": 7}), done
    finally:
        old.stop()
        if new is not None:
            new.stop()


def test_a_countdown_held_by_a_busy_worker_is_not_sent_again(services: Services,
                                                             iso: Isolated) -> None:
    # given a worker with one process that takes a job with a 3 s countdown (it holds the
    # message until then), then a job that keeps its only process busy for 25 s, so the
    # first waits for a free process long past WARDEN_RELAY_LOST_AFTER (15 s here)
    worker = start_worker(services, "busy", concurrency=1,
                          env={**iso.env, "WARDEN_RELAY_LOST_AFTER": "15"})
    try:
        held = iso.insert_job("testing.sleep_effect", {"seconds": 0})
        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            conn.execute("UPDATE job_runs SET published_at = now(), "
                         "not_before = now() + interval '3 seconds' WHERE id = %s", (held,))
        published = iso.job(held)["published_at"]
        with Connection(iso.redis_url) as broker:
            app.send_task("testing.sleep_effect", kwargs={"params": {"seconds": 0}},
                          task_id=held, countdown=3, connection=broker)
        time.sleep(0.5)
        busy = iso.insert_job("testing.sleep_effect", {"seconds": 25})
        iso.wait(busy, {"running"}, timeout=30)
        # then the relay leaves it alone while the worker holds it (the worker announces
        # what it holds), and it runs once, when the process is free again
        done = iso.wait(held, {"succeeded", "failed", "dead"}, timeout=90)
        assert done["status"] == "succeeded", done
        assert done["started_at"] > iso.job(busy)["started_at"], "it did wait"
        assert done["published_at"] == published, "the relay re-sent a held message"
        assert "relay.messages_lost" not in worker.tail(500_000)
    finally:
        worker.stop()
