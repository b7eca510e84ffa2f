"""Fault-injection job types for the adversarial review tests (tests/reliability/test_review_*).

Loaded only by the workers those tests start, with
WARDEN_EXTRA_TASK_MODULES='["tests.support.tasks", "tests.support.review_tasks"]'.
"""

from __future__ import annotations

import contextlib
import os
import time

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel
from sqlalchemy import text

from tests.support.tasks import _record_start
from workers.app import app
from workers.jobs import JobTask


class StubbornParams(BaseModel):
    seconds: float = 30.0


@app.task(name="review.stubborn", base=JobTask, params=StubbornParams, bind=True)
def stubborn(self: JobTask, params: StubbornParams) -> dict[str, int]:
    """A job the soft time limit cannot stop (as a family's broad `except Exception` around
    a slow step would swallow SoftTimeLimitExceeded, or a C call that never returns to
    Python): only the hard time limit ends it.

    Idempotency: the effect row and the outcome commit together (self.complete).
    """
    _record_start(self.job_id)
    deadline = time.monotonic() + params.seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(SoftTimeLimitExceeded):
            time.sleep(0.2)
    with self.session() as s:
        s.execute(text("INSERT INTO test_effects (job_id, pid) VALUES (:j, :p)"),
                  {"j": self.job_id, "p": os.getpid()})
        return self.complete(s, {"pid": os.getpid()})


class SingletonEffectParams(BaseModel):
    seconds: float = 0.0


@app.task(name="review.singleton_effect", base=JobTask, params=SingletonEffectParams,
          bind=True, singleton=True)
def singleton_effect(self: JobTask, params: SingletonEffectParams) -> dict[str, int]:
    """A singleton whose effect commits with its outcome; its start and its effect rows tell
    when each committed run held the type.

    Idempotency: effect and outcome in one fenced transaction (self.complete).
    """
    _record_start(self.job_id)
    deadline = time.monotonic() + params.seconds
    while time.monotonic() < deadline:
        time.sleep(0.1)
    with self.session() as s:
        s.execute(text("INSERT INTO test_effects (job_id, pid) VALUES (:j, :p)"),
                  {"j": self.job_id, "p": os.getpid()})
        return self.complete(s, {"pid": os.getpid()})


class SlowFlakyParams(BaseModel):
    seconds: float = 0.0


@app.task(name="review.slow_flaky", base=JobTask, params=SlowFlakyParams, bind=True,
          max_attempts=3)
def slow_flaky(self: JobTask, params: SlowFlakyParams) -> dict[str, str]:
    """Record a start, sleep, then fail transiently until testing:fixed:<job id> exists.

    Idempotency: no effect besides its result.
    """
    from workers.errors import TransientError
    from workers.redis_client import get_redis

    _record_start(self.job_id)
    time.sleep(params.seconds)
    if not get_redis().exists(f"testing:fixed:{self.job_id}"):
        raise TransientError("dependency down (simulated)")
    return {"fixed": "yes"}


class SlowResumeParams(BaseModel):
    chunks: int = 2
    resume_seconds: float = 0.0


class FixableChunkParams(BaseModel):
    n: int


@app.task(name="review.fan_parent_slow_resume", base=JobTask, params=SlowResumeParams,
          bind=True)
def fan_parent_slow_resume(self: JobTask, params: SlowResumeParams) -> dict[str, object]:
    """Fan out fixable chunks; once they have ended, take `resume_seconds` to add them up.

    Idempotency: children keyed <parent>:<n>; the totals come from their stored results.
    """
    _record_start(self.job_id)
    children = self.fan_out(lambda: [("review.fixable_chunk", {"n": i})
                                     for i in range(params.chunks)])
    time.sleep(params.resume_seconds)
    return {"total": sum(c.result["n"] for c in children if c.status == "succeeded"),
            "statuses": sorted(c.status for c in children)}


@app.task(name="review.fixable_chunk", base=JobTask, params=FixableChunkParams, bind=True)
def fixable_chunk(self: JobTask, params: FixableChunkParams) -> dict[str, int]:
    """Fail cleanly (JobError, final) until the Redis key testing:fixed:<job id> exists.

    Idempotency: no effect besides its result.
    """
    from workers.errors import JobError
    from workers.redis_client import get_redis

    if not get_redis().exists(f"testing:fixed:{self.job_id}"):
        raise JobError("input not fixed yet", code="not_fixed")
    return {"n": params.n}


class LongStepParams(BaseModel):
    seconds: float = 0.0


@app.task(name="review.long_step", base=JobTask, params=LongStepParams, bind=True)
def long_step(self: JobTask, params: LongStepParams) -> dict[str, int]:
    """Two fenced steps: a long one (a big batch), then a short one with the outcome.

    Idempotency: each step's effect commits in its own fenced transaction; the second step
    carries the outcome (self.complete). A run that keeps the job commits both once.
    """
    _record_start(self.job_id)
    with self.session() as s:
        s.execute(text("INSERT INTO test_effects (job_id, pid) VALUES (:j, :p)"),
                  {"j": self.job_id, "p": os.getpid()})
        time.sleep(params.seconds)  # the step's work, inside its transaction
    time.sleep(2)  # between the steps
    with self.session() as s:
        s.execute(text("INSERT INTO test_effects (job_id, pid) VALUES (:j, :p)"),
                  {"j": self.job_id, "p": os.getpid()})
        return self.complete(s, {"pid": os.getpid()})
