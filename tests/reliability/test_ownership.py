"""The job core's promises under real faults (issue 5, scenarios 1-7), with real processes.

Each test runs its own deployment (a fresh database and a Redis server of its own, see
`isolated`) with real worker processes and no API unless it says so: recovery must not wait
on an API. Effects are rows in test_effects with no unique key, so a second application of
an effect is a second row, and "once" is counted in the database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from tests.conftest import Isolated, Proc, Services, start_api, start_worker
from workers.tokens import hash_token

pytestmark = pytest.mark.slow
TTL = 3.0  # WARDEN_LEASE_TTL in tests



def _starts(iso: Isolated, job_id: str) -> int:
    return iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", job_id)


def _effects(iso: Isolated, job_id: str) -> int:
    return iso.count("SELECT count(*) FROM test_effects WHERE job_id = %s", job_id)


def _wait_started(iso: Isolated, job_id: str, n: int = 1, timeout: float = 30) -> int:
    """Until the task body began n times; returns the pid of the latest start."""
    deadline = time.monotonic() + timeout
    while _starts(iso, job_id) < n:
        assert time.monotonic() < deadline, iso.job(job_id)
        time.sleep(0.05)
    return iso.count("SELECT pid FROM test_starts WHERE job_id = %s ORDER BY id DESC LIMIT 1",
                     job_id)


def test_database_backends_terminated_mid_job_end_succeeded_once(
    services: Services, iso: Isolated
) -> None:
    # given a worker running a slow job whose effect and outcome commit together
    worker = start_worker(services, "pgdrop", concurrency=1, env=iso.env)
    try:
        job_id = iso.insert_job("testing.sleep_effect", {"seconds": 3})
        _wait_started(iso, job_id)
        # when every idle backend of the platform is terminated, twice, while it runs
        # (as a database restart or a proxy dropping idle connections would)
        for _ in range(2):
            with psycopg.connect(iso.database_url, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                             "AND application_name = 'warden' AND state = 'idle'")
            time.sleep(1)
        # then the job ends succeeded, ran once, and its effect was applied once
        done = iso.wait(job_id, {"succeeded", "failed", "dead"})
        assert (done["status"], done["attempts"]) == ("succeeded", 1), done
        assert _starts(iso, job_id) == 1
        assert _effects(iso, job_id) == 1
    finally:
        worker.stop()


def test_a_stalled_owner_is_fenced_off_when_another_run_takes_the_job(
    services: Services, iso: Isolated
) -> None:
    # given a worker running a job
    first = start_worker(services, "stall", concurrency=1, env=iso.env)
    second: Proc | None = None
    stalled_pid = 0
    try:
        job_id = iso.insert_job("testing.sleep_effect", {"seconds": 2})
        stalled_pid = _wait_started(iso, job_id)
        # when its process stalls (SIGSTOP) past the lease, and another worker is there
        os.kill(stalled_pid, signal.SIGSTOP)
        second = start_worker(services, "takeover", concurrency=1, env=iso.env)
        # then the relay re-sends the stalled job and the other worker takes it over
        done = iso.wait(job_id, {"succeeded", "failed", "dead"}, timeout=60)
        assert done["status"] == "succeeded", done
        assert _starts(iso, job_id) == 2
        # when the stalled run wakes up and reaches its commit
        os.kill(stalled_pid, signal.SIGCONT)
        stalled_pid = 0
        time.sleep(4)
        # then it changed nothing: one effect, the taker's result, epoch 2
        after = iso.job(job_id)
        assert _effects(iso, job_id) == 1
        assert after["status"] == "succeeded"
        assert after["epoch"] == 2 and after["attempts"] == 2
        effect_pid = iso.count("SELECT pid FROM test_effects WHERE job_id = %s", job_id)
        assert after["result"] == {"pid": effect_pid}
    finally:
        if stalled_pid:
            os.kill(stalled_pid, signal.SIGCONT)
        first.stop()
        if second is not None:
            second.stop()


def test_a_retry_whose_publish_failed_still_runs_with_no_api(
    services: Services, iso: Isolated
) -> None:
    # given a worker and no API; a job that fails transiently once, and whose retry message
    # the worker cannot publish (fault injection in the pool process)
    worker = start_worker(services, "retrypub", concurrency=1, env=iso.env)
    try:
        job_id = iso.insert_job("testing.flaky", {"fail_retry_publish": True})
        # its first message is sent as the accepting API sends it (and the row marked
        # published), so the only message missing is the retry's
        from kombu import Connection

        from workers.app import app

        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            conn.execute("UPDATE job_runs SET published_at = now() WHERE id = %s", (job_id,))
        with Connection(iso.redis_url) as broker:
            app.send_task("testing.flaky", kwargs={"params": {"fail_retry_publish": True}},
                          task_id=job_id, connection=broker)
        _wait_started(iso, job_id)
        redis.Redis.from_url(iso.redis_url).set(f"testing:fixed:{job_id}", "1")
        # then the retry is recorded, sent by the relay when due, and the job succeeds
        done = iso.wait(job_id, {"succeeded", "dead", "failed"}, timeout=60)
        assert done["status"] == "succeeded", (done, worker.tail())
        assert done["attempts"] == 2
        assert "publish refused" in worker.tail(200_000)
    finally:
        worker.stop()


def test_a_lost_message_still_runs_with_no_api(services: Services, iso: Isolated) -> None:
    # given a job recorded as published a minute ago whose message Redis no longer holds
    job_id = iso.insert_job("testing.sleep_effect", {"seconds": 0}, status="queued")
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        conn.execute("UPDATE job_runs SET published_at = now() - interval '1 minute', "
                     "created_at = now() - interval '1 minute' WHERE id = %s", (job_id,))
    # when only a worker runs (no API); then its relay sees the queue lacks it and re-sends
    worker = start_worker(services, "lostmsg", concurrency=1, env=iso.env)
    try:
        done = iso.wait(job_id, {"succeeded"}, timeout=30)
        assert done["attempts"] == 1
        assert _effects(iso, job_id) == 1
    finally:
        worker.stop()


def test_a_message_waiting_in_the_queue_is_not_sent_again_but_a_lost_one_is(
    services: Services, iso: Isolated
) -> None:
    # given two jobs published a minute ago and never delivered (no worker consumes yet):
    # one whose message IS in the queue, one whose message Redis lost; and a relay process
    from kombu import Connection

    from workers.app import app

    waiting = iso.insert_job("testing.sleep_effect", {"seconds": 0})
    lost = iso.insert_job("testing.sleep_effect", {"seconds": 0})
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        conn.execute("UPDATE job_runs SET published_at = now() - interval '1 minute' "
                     "WHERE id = ANY(%s)", ([waiting, lost],))
    with Connection(iso.redis_url) as broker:
        app.send_task("testing.sleep_effect", kwargs={"params": {"seconds": 0}},
                      task_id=waiting, connection=broker)
    relay = Proc(["relay"], services.env(**iso.env), services.data_dir / f"relay-{lost}.log")
    try:
        deadline = time.monotonic() + 20
        queued: list[str] = []
        while time.monotonic() < deadline:
            queued = sorted(_queued_ids(iso.redis_url))
            if len(queued) >= 2:
                break
            time.sleep(0.2)
        time.sleep(3)  # several more relay passes (0.5 s each in tests)
        # then the relay sent the lost one once, and left the waiting one alone
        assert relay.alive(), relay.tail()
        assert sorted(_queued_ids(iso.redis_url)) == sorted([waiting, lost])
        assert iso.count("SELECT count(*) FROM job_runs WHERE id = %s AND "
                         "published_at < now() - interval '50 seconds'", waiting) == 1
    finally:
        relay.stop()


def _queued_ids(redis_url: str) -> list[str]:
    import json

    raw = redis.Redis.from_url(redis_url).lrange("warden", 0, -1)
    return [json.loads(m)["headers"]["id"] for m in raw]


def test_dropped_broker_connections_do_not_cancel_running_jobs(
    services: Services, iso: Isolated
) -> None:
    # given a worker running a 4-second job, with a free pool slot: its consumer keeps a
    # BRPOP in flight, so it sees a dropped connection at once (with one slot and
    # prefetch 1 it reads nothing until the job ends, and never notices the drop)
    worker = start_worker(services, "connloss", concurrency=2, env=iso.env)
    try:
        job_id = iso.insert_job("testing.sleep_effect", {"seconds": 4})
        _wait_started(iso, job_id)
        # when every client connection of that Redis is killed (a failover, a client kill)
        killed = redis.Redis.from_url(iso.redis_url).client_kill_filter(_type="normal",
                                                                         skipme=True)
        assert killed >= 1
        # then the job runs on to the end, once, with one attempt
        done = iso.wait(job_id, {"succeeded", "failed", "dead"}, timeout=60)
        assert (done["status"], done["attempts"]) == ("succeeded", 1), (done, worker.tail())
        time.sleep(2)  # a restored duplicate, if any, would start and count now
        assert _starts(iso, job_id) == 1
        assert _effects(iso, job_id) == 1
    finally:
        worker.stop()


def test_two_deployments_share_one_redis_by_prefix(
    services: Services, iso: Isolated, tmp_path: Path
) -> None:
    # given a second deployment (its own database) on the same Redis, each with its prefix
    from tests.conftest import fresh_database
    from tests.support.tasks import EFFECTS_DDL

    procs: list[Proc] = []
    with fresh_database(services) as other_db:
        with psycopg.connect(other_db, autocommit=True) as conn:
            conn.execute(EFFECTS_DDL)
        a = {**iso.env, "WARDEN_BROKER_KEY_PREFIX": "dep-a:"}
        b = {**iso.env, "WARDEN_DATABASE_URL": other_db, "WARDEN_BROKER_KEY_PREFIX": "dep-b:"}
        other = Isolated(other_db, iso.redis_url, iso.redis, b)
        try:
            for name, env in (("dep-a", a), ("dep-b", b)):
                procs.append(start_worker(services, name, concurrency=1, env=env))
                procs.append(Proc(["beat"], services.env(**env),
                                  services.data_dir / f"beat-{name}-{os.getpid()}.log"))
            # and a third deployment on that Redis (no prefix) holding its relay's lease
            third = redis.Redis.from_url(iso.redis_url)
            third.set("warden:lease:relay", "other-host:0:1:third", px=120_000)
            # when each deployment accepts a job while its publish was missed
            ja = iso.insert_job("testing.sleep_effect", {"seconds": 0})
            jb = other.insert_job("testing.sleep_effect", {"seconds": 0})
            # then each deployment's relay sends its own, and each runs once, in its database
            assert iso.wait(ja, {"succeeded"}, timeout=30)["attempts"] == 1
            assert other.wait(jb, {"succeeded"}, timeout=30)["attempts"] == 1
            third.delete("warden:lease:relay")  # the third deployment's, not a stray of theirs
            # and each beat holds its own RedBeat lock, under its prefix
            r = redis.Redis.from_url(iso.redis_url, decode_responses=True)
            deadline = time.monotonic() + 30
            locks: list[str] = []
            while time.monotonic() < deadline:
                locks = sorted(k for k in r.keys("*redbeat*") if k.endswith(":lock"))
                if locks == ["dep-a:warden:redbeat::lock", "dep-b:warden:redbeat::lock"]:
                    break
                time.sleep(0.3)
            assert locks == ["dep-a:warden:redbeat::lock", "dep-b:warden:redbeat::lock"]
            # and no key of the platform is outside a prefix
            stray = [k for k in r.keys("*") if not k.startswith(("dep-a:", "dep-b:"))
                     and not k.startswith(("_kombu", "testing:"))]
            assert stray == [], stray
        finally:
            for proc in procs:
                proc.stop()


def test_the_api_answers_while_redis_hangs(services: Services, iso: Isolated) -> None:
    # given an API on a Redis that then hangs instead of refusing (a paused server)
    token = "wdn_hang-test-token-0123456789"
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO api_tokens (name, token_hash, scopes) "
                     "VALUES ('hang', %s, '{enqueue,read}')", (hash_token(token),))
    api, base = start_api(services, env=iso.env)
    auth = {"Authorization": f"Bearer {token}"}
    assert iso.redis.proc is not None
    redis_pid = iso.redis.proc.pid
    try:
        warm = httpx.post(f"{base}/v1/jobs", headers=auth, timeout=10,
                          json={"type": "platform.ping", "params": {"echo": "warm"}})
        assert warm.status_code == 202
        os.kill(redis_pid, signal.SIGSTOP)
        # when jobs are posted while it hangs, and /healthz is asked meanwhile
        results: list[tuple[int, float]] = []

        def post(n: int) -> None:
            started = time.monotonic()
            r = httpx.post(f"{base}/v1/jobs", headers=auth, timeout=30,
                           json={"type": "platform.ping", "params": {"echo": f"hang-{n}"}})
            results.append((r.status_code, time.monotonic() - started))

        posters = [threading.Thread(target=post, args=(n,)) for n in range(3)]
        for t in posters:
            t.start()
        time.sleep(0.3)
        started = time.monotonic()
        health = httpx.get(f"{base}/healthz", timeout=30)
        health_seconds = time.monotonic() - started
        for t in posters:
            t.join(30)
        # then every route answers at once: the publish waits in the background
        assert health.status_code == 200
        assert health_seconds < 1.0, health_seconds
        assert [code for code, _ in results] == [202, 202, 202]
        assert max(seconds for _, seconds in results) < 2.0, results
    finally:
        os.kill(redis_pid, signal.SIGCONT)
        api.stop()


def test_an_unknown_job_type_fails_and_is_retryable_once_a_worker_knows_it(
    services: Services, iso: Isolated
) -> None:
    # given a worker that does not know a job type (an older deploy)
    old = start_worker(services, "old", concurrency=1, env=iso.env)
    new: Proc | None = None
    try:
        job_id = iso.insert_job("testing.added_later", {"n": 1})
        # then the job ends failed with unknown_job_type, not queued forever
        failed = iso.wait(job_id, {"failed"}, timeout=30)
        assert failed["error_code"] == "unknown_job_type"
        assert "testing.added_later" in str(failed["error_message"])
        # when the new deploy (a worker that knows it) replaces the old one
        old.stop()
        new = start_worker(services, "new", concurrency=1, env={
            **iso.env,
            "WARDEN_EXTRA_TASK_MODULES": '["tests.support.tasks", "tests.support.late_tasks"]'})
        # and an operator retries it (`warden retry`); then it runs and succeeds
        retried = subprocess.run([sys.executable, "-m", "cli.main", "retry", job_id,
                                  "--reason", "the new deploy knows the type"],
                                 env=services.env(**iso.env), capture_output=True, text=True,
                                 timeout=60, check=False)
        assert retried.returncode == 0, retried.stderr
        done = iso.wait(job_id, {"succeeded", "failed"}, timeout=30)
        assert done["status"] == "succeeded"
        assert done["result"] == {"n": 1}
    finally:
        old.stop()
        if new is not None:
            new.stop()
