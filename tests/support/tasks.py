"""Fault-injection job types, loaded only by test workers (WARDEN_EXTRA_TASK_MODULES)."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import signals
from pydantic import BaseModel
from sqlalchemy import text

from workers.app import app
from workers.db import session_scope
from workers.errors import TransientError
from workers.jobs import JobTask
from workers.redis_client import get_redis

# Effects are NOT deduplicated by the table (no unique key on job_id): a second application
# is a second row, so a test that counts rows sees it. Once-ness must come from the core.
EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS test_effects (
    id bigserial PRIMARY KEY, job_id uuid NOT NULL, pid int NOT NULL,
    created_at timestamptz DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ix_test_effects_job ON test_effects (job_id);
CREATE TABLE IF NOT EXISTS test_starts (
    id bigserial PRIMARY KEY, job_id uuid NOT NULL, pid int NOT NULL,
    created_at timestamptz DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ix_test_starts_job ON test_starts (job_id);
"""


class SleepParams(BaseModel):
    seconds: float = 0.0


class FlakyParams(BaseModel):
    note: str = ""
    # Fault injection: the retry message this worker sends for the job fails to publish.
    fail_retry_publish: bool = False


def _record_start(job_id: str) -> None:
    """Each execution leaves a row (committed at once), so a test can count runs."""
    with session_scope() as s:
        s.execute(text("INSERT INTO test_starts (job_id, pid) VALUES (:j, :p)"),
                  {"j": job_id, "p": os.getpid()})


@app.task(name="testing.sleep_effect", base=JobTask, params=SleepParams, bind=True)
def sleep_effect(self: JobTask, params: SleepParams) -> dict[str, int]:
    """Record a start, sleep, then apply the effect and record the outcome together.

    Idempotency: the effect row and the job's outcome commit in one fenced transaction
    (self.complete), so a second run, or a run that lost the job, adds no second row.
    """
    _record_start(self.job_id)
    time.sleep(params.seconds)
    with self.session() as s:
        s.execute(text("INSERT INTO test_effects (job_id, pid) VALUES (:j, :p)"),
                  {"j": self.job_id, "p": os.getpid()})
        return self.complete(s, {"pid": os.getpid()})


@app.task(name="testing.singleton_sleep", base=JobTask, params=SleepParams, bind=True,
          singleton=True)
def singleton_sleep(self: JobTask, params: SleepParams) -> dict[str, float]:
    """Sleep while the type's singleton guard holds; returns when it ran.

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


class FanParams(BaseModel):
    chunks: int = 3
    seconds: float = 0.0


class ChunkParams(BaseModel):
    n: int
    seconds: float = 0.0


@app.task(name="testing.fan_parent", base=JobTask, params=FanParams, bind=True)
def fan_parent(self: JobTask, params: FanParams) -> dict[str, Any]:
    """Fan out `chunks` children, then sum their results.

    Idempotency: children are keyed <parent>:<n>; the sum is computed from their stored
    results.
    """
    children = self.fan_out(lambda: [("testing.fan_chunk", {"n": i, "seconds": params.seconds})
                                     for i in range(params.chunks)])
    return {"total": sum(c.result["n"] for c in children if c.status == "succeeded"),
            "statuses": sorted(c.status for c in children)}


@app.task(name="testing.fan_chunk", base=JobTask, params=ChunkParams, bind=True)
def fan_chunk(self: JobTask, params: ChunkParams) -> dict[str, int]:
    """One chunk: record a start, sleep, apply the effect with the outcome.

    Idempotency: effect and outcome in one fenced transaction.
    """
    _record_start(self.job_id)
    time.sleep(params.seconds)
    with self.session() as s:
        s.execute(text("INSERT INTO test_effects (job_id, pid) VALUES (:j, :p)"),
                  {"j": self.job_id, "p": os.getpid()})
        return self.complete(s, {"n": params.n})


@signals.worker_process_init.connect
def _refuse_marked_publishes(**_: Any) -> None:
    """Fault injection: inside a pool child, a job whose params ask for it cannot be
    published (as when Redis refuses the retry's message); the main process (its relay)
    and other producers publish it normally.

    It wraps kombu's Producer.publish: an exception raised in a before_task_publish handler
    does not stop the publish (Celery's Signal.send logs "Signal handler ... raised" and
    sends the message anyway)."""
    from kombu import Producer

    real = Producer.publish

    def publish(self: Producer, body: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            params = body[1]["params"]
        except (TypeError, KeyError, IndexError):
            params = None
        if isinstance(params, dict) and params.get("fail_retry_publish"):
            raise ConnectionError("publish refused (fault injection)")
        return real(self, body, *args, **kwargs)

    Producer.publish = publish  # type: ignore[method-assign]
