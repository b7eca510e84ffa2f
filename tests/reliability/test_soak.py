"""Soak: thousands of jobs with effects in Postgres while processes die, backends are
terminated and Redis pauses, at random moments. Every job must succeed, every effect be
applied exactly once, counted in the database.

`make test` and `make test-external` run it at WARDEN_SOAK_JOBS=1500 (about a minute of
faults; the suite has to fit in 10 minutes on 2 cores); `make test-faults` runs the fault
tests with a soak of 6000.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

from tests.conftest import Proc, Services, isolated, start_worker

pytestmark = [pytest.mark.slow, pytest.mark.soak]

WAVE = 100


def _pool_children(worker: Proc) -> list[psutil.Process]:
    """The prefork pool processes of a worker (children of its main process)."""
    try:
        main = psutil.Process(worker.pid)
        return [c for c in main.children(recursive=True) if c.is_running()]
    except psutil.NoSuchProcess:
        return []


def test_soak_every_job_once_under_random_faults(services: Services, tmp_path: Path) -> None:
    total = int(os.environ.get("WARDEN_SOAK_JOBS", "1500"))
    rng = random.Random(int(os.environ.get("WARDEN_SOAK_SEED", "7")))
    faults: Counter[str] = Counter()
    with isolated(services, tmp_path) as iso:
        # given two workers (two pool processes each) and a budget that survives the kills
        env = {**iso.env, "WARDEN_MAX_ATTEMPTS": "20"}
        workers = [start_worker(services, f"soak{i}", concurrency=2, env=env) for i in range(2)]
        broker = redis.Redis.from_url(iso.redis_url)
        try:
            with psycopg.connect(iso.database_url, autocommit=True) as db:
                inserted = 0
                planned = ["kill", "pause", "terminate"] * 2
                deadline = time.monotonic() + 600
                # when jobs arrive in waves (each left to the relays to publish) while, at
                # random moments, a pool process is SIGKILLed, the platform's Postgres
                # backends are terminated, or Redis pauses every client
                while time.monotonic() < deadline:
                    if inserted < total:
                        db.execute(
                            "INSERT INTO job_runs (id, type, params, max_attempts) "
                            "SELECT gen_random_uuid(), 'testing.sleep_effect', "
                            "jsonb_build_object('seconds', round((random() * 0.05)::numeric, 3)), "
                            "20 FROM generate_series(1, %s)", (min(WAVE, total - inserted),))
                        inserted += min(WAVE, total - inserted)
                    # each kind of fault twice first (while the first waves run: a quick
                    # machine may drain the soak in a dozen rounds), then at random
                    fault = (planned.pop(0) if planned else
                             rng.choice(["kill", "kill", "terminate", "pause", "none"]))
                    if fault == "kill":
                        children = [c for w in workers for c in _pool_children(w)]
                        if children:
                            victim = rng.choice(children)
                            try:
                                os.kill(victim.pid, signal.SIGKILL)
                                faults["pool process SIGKILLed"] += 1
                            except ProcessLookupError:
                                pass
                    elif fault == "terminate":
                        db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = current_database() "
                                   "AND pid <> pg_backend_pid() "
                                   "AND application_name = 'warden'")
                        faults["backends terminated"] += 1
                    elif fault == "pause":
                        broker.execute_command("CLIENT", "PAUSE", rng.randint(500, 3000))
                        faults["redis paused"] += 1
                    time.sleep(rng.uniform(0.5, 2.0))
                    row = db.execute("SELECT count(*) FILTER (WHERE status IN "
                                     "('succeeded','failed','dead','cancelled')), count(*) "
                                     "FROM job_runs").fetchone()
                    assert row is not None
                    if inserted >= total and row[0] == row[1] == total:
                        break
                # then every job succeeded, and every effect was applied exactly once
                statuses = dict(db.execute(
                    "SELECT status, count(*) FROM job_runs GROUP BY 1").fetchall())
                assert statuses == {"succeeded": total}, (statuses, faults)
                per_job = dict(db.execute(
                    "SELECT n, count(*) FROM (SELECT j.id, count(e.id) AS n FROM job_runs j "
                    "LEFT JOIN test_effects e ON e.job_id = j.id GROUP BY j.id) t "
                    "GROUP BY n").fetchall())
                assert per_job == {1: total}, (per_job, faults)
                # and the faults really happened while the jobs ran
                assert faults["pool process SIGKILLed"] >= 3, faults
                assert faults["backends terminated"] >= 2, faults
                assert faults["redis paused"] >= 2, faults
                reruns = db.execute("SELECT count(*) FROM job_runs WHERE attempts > 1"
                                    ).fetchone()
                print(f"soak: {total} jobs, faults {dict(faults)}, "
                      f"jobs run more than once {reruns[0] if reruns else '?'}")
        finally:
            for w in workers:
                w.stop()
