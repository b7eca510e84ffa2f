"""Messages belong to the database they were accepted into (issue 13, operator drill D1).

An operator pointed the CLI at a restored copy (WARDEN_DATABASE_URL=<copy>) on the live
Redis: the live worker adopted the message and ran `audit --fix` against the live data.
Every message now carries its database's identity; a worker refuses another's, and a
message with no row and no stamp (a bare `celery call`) is adopted only where allowed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import psycopg
import pytest
import redis
from kombu import Connection

from tests.conftest import ROOT, Isolated, Services, fresh_database, start_worker
from tests.support.tasks import EFFECTS_DDL
from workers.app import app

pytestmark = pytest.mark.slow


def _wait_log(worker_tail: object, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker_tail():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{text!r} not logged"
        time.sleep(0.1)


def test_a_cli_aimed_at_another_database_never_runs_its_job_on_this_one(
        services: Services, iso: Isolated) -> None:
    # given a live worker of this deployment, and another database (a restored copy) on
    # the same server, sharing the worker's Redis
    worker = start_worker(services, "live", concurrency=1, env=iso.env)
    try:
        with fresh_database(services) as other_url:
            with psycopg.connect(other_url, autocommit=True) as conn:
                conn.execute(EFFECTS_DDL)
            # when an operator enqueues a job with the CLI pointed at the other database
            out = subprocess.run(
                [sys.executable, "-m", "cli.main", "enqueue", "testing.sleep_effect",
                 "-p", "seconds=0", "--wait", "--timeout", "8"],
                env=services.env(WARDEN_DATABASE_URL=other_url, WARDEN_REDIS_URL=iso.redis_url),
                capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
            # then the CLI says the job is still queued and why no worker runs it
            assert out.returncode != 0, out.stdout
            assert "still queued" in out.stderr, out.stderr
            assert "another deployment" in out.stderr, out.stderr
            with psycopg.connect(other_url, autocommit=True) as conn:
                rows = conn.execute("SELECT id, status FROM job_runs").fetchall()
            assert [status for _, status in rows] == ["queued"]
            job_id = str(rows[0][0])
            # and the live database got no row and no effect: the live worker refused it
            assert iso.count("SELECT count(*) FROM job_runs WHERE id = %s", job_id) == 0
            assert iso.count("SELECT count(*) FROM test_effects") == 0
            _wait_log(worker.tail, "job.wrong_deployment")
    finally:
        worker.stop()


def test_a_bare_message_is_refused_unless_adoption_is_allowed(services: Services,
                                                              iso: Isolated) -> None:
    refusing = start_worker(services, "strict", concurrency=1, env=iso.env)
    try:
        # given a message sent past the enqueue path (`celery call`): no row, no stamp
        job_id = str(uuid.uuid4())
        with Connection(iso.redis_url) as broker:
            app.send_task("testing.sleep_effect", kwargs={"params": {"seconds": 0}},
                          task_id=job_id, connection=broker)
        # then a worker that was not told to adopt such messages refuses it, touching nothing
        _wait_log(refusing.tail, "job.refused_bare_message")
        assert iso.count("SELECT count(*) FROM job_runs WHERE id = %s", job_id) == 0
    finally:
        refusing.stop()
    adopting = start_worker(services, "adopt", concurrency=1,
                            env={**iso.env, "WARDEN_ADOPT_BARE_MESSAGES": "true"})
    try:
        # when adoption is allowed, the same kind of message is given a row and runs
        job_id = str(uuid.uuid4())
        with Connection(iso.redis_url) as broker:
            app.send_task("testing.sleep_effect", kwargs={"params": {"seconds": 0}},
                          task_id=job_id, connection=broker)
        deadline = time.monotonic() + 30
        while not iso.count("SELECT count(*) FROM job_runs WHERE id = %s", job_id):
            assert time.monotonic() < deadline, adopting.tail(20_000)
            time.sleep(0.1)
        done = iso.wait(job_id, {"succeeded", "failed"}, timeout=30)
        assert (done["status"], done["source"]) == ("succeeded", "celery")
    finally:
        adopting.stop()


def test_every_message_carries_its_database_identity(services: Services, iso: Isolated
                                                     ) -> None:
    # given a job accepted by the CLI into this deployment's database (no worker running)
    out = subprocess.run([sys.executable, "-m", "cli.main", "enqueue", "platform.ping"],
                         env=services.env(**iso.env), capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=True)
    job_id = json.loads(out.stdout)["id"]
    # then its message names the database: server identifier and database name
    raw = redis.Redis.from_url(iso.redis_url).lrange("warden", 0, -1)
    headers = [json.loads(m)["headers"] for m in raw]
    mine = [h for h in headers if h["id"] == job_id]
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        sysid, name = conn.execute("SELECT (SELECT system_identifier FROM pg_control_system()), "
                                   "current_database()").fetchone()  # type: ignore[misc]
    assert [h.get("warden_deployment") for h in mine] == [f"pg:{sysid}/{name}"]
