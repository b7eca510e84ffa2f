"""Fault-injection job types, loaded only by test workers (WARDEN_EXTRA_TASK_MODULES)."""

from __future__ import annotations

import os
import time

from pydantic import BaseModel
from sqlalchemy import text

from workers.app import app
from workers.db import session_scope
from workers.errors import TransientError
from workers.jobs import JobTask
from workers.redis_client import get_redis

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS test_effects (
    job_id uuid PRIMARY KEY, pid int NOT NULL, created_at timestamptz DEFAULT now()
);
CREATE TABLE IF NOT EXISTS test_starts (
    id bigserial PRIMARY KEY, job_id uuid NOT NULL, pid int NOT NULL,
    created_at timestamptz DEFAULT now()
);
"""


class SleepParams(BaseModel):
    seconds: float = 0.0


class FlakyParams(BaseModel):
    note: str = ""


def _record_start(job_id: str) -> None:
    """Each execution leaves a row (committed at once), so a test can count runs."""
    with session_scope() as s:
        s.execute(text("INSERT INTO test_starts (job_id, pid) VALUES (:j, :p)"),
                  {"j": job_id, "p": os.getpid()})


@app.task(name="testing.sleep_effect", base=JobTask, params=SleepParams, bind=True)
def sleep_effect(self: JobTask, params: SleepParams) -> dict[str, int]:
    """Record a start, sleep, then apply the effect once.

    Idempotency: the effect row is keyed by job id (ON CONFLICT DO NOTHING).
    """
    _record_start(self.job_id)
    time.sleep(params.seconds)
    with self.session() as s:
        s.execute(text("INSERT INTO test_effects (job_id, pid) VALUES (:j, :p) "
                       "ON CONFLICT (job_id) DO NOTHING"), {"j": self.job_id, "p": os.getpid()})
    return {"pid": os.getpid()}


@app.task(name="testing.singleton_sleep", base=JobTask, params=SleepParams, bind=True,
          singleton=True)
def singleton_sleep(self: JobTask, params: SleepParams) -> dict[str, float]:
    """Sleep while holding the type's singleton lease; returns when it ran.

    Idempotency: no effect besides its result.
    """
    started = time.time()
    time.sleep(params.seconds)
    return {"started": started, "ended": time.time()}


@app.task(name="testing.flaky", base=JobTask, params=FlakyParams, bind=True, max_attempts=3)
def flaky(self: JobTask, params: FlakyParams) -> dict[str, str]:
    """Raise a transient error until the Redis key testing:fixed:<job id> exists.

    Idempotency: no effect besides its result.
    """
    _record_start(self.job_id)
    if not get_redis().exists(f"testing:fixed:{self.job_id}"):
        raise TransientError("dependency down (simulated)")
    return {"fixed": "yes"}
