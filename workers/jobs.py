"""JobTask: the base every Warden task runs on.

Per delivery: take the job's lease (one runner at a time, even with duplicate messages),
take the type's singleton lease if it has one, claim the job_runs row (attempts+1; a
finished job is not run again), run, and record succeeded/failed/retrying/dead.
"""

from __future__ import annotations

import os
import random
import socket
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import redis
import sqlalchemy.exc
import structlog
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from workers import jobstore, leases
from workers.db import session_scope
from workers.errors import JobError, TransientError
from workers.settings import get_settings

log = structlog.get_logger("warden.jobs")

TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    TransientError,
    sqlalchemy.exc.OperationalError,  # connection lost, deadlock, lock timeout, serialization
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # pool exhausted
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)


def backoff(attempt: int, base: float | None = None, cap: float | None = None) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, so a herd spreads out."""
    settings = get_settings()
    base = settings.retry_backoff_base if base is None else base
    cap = settings.retry_backoff_max if cap is None else cap
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    return delay / 2 + random.uniform(0, delay / 2)


def job_lease_key(job_id: str) -> str:
    return f"warden:lease:job:{job_id}"


def singleton_lease_key(job_type: str) -> str:
    return f"warden:lease:singleton:{job_type}"


class JobTask(Task):
    """Base class of Warden tasks. Set `params` (a pydantic model) in the task decorator;
    `singleton=True` allows one running job of the type at a time."""

    abstract = True
    typing = False  # arguments are validated against `params`, not the signature
    # Celery's own retry cap (default 3) is off: re-deliveries that wait for a lease or ride
    # out an outage must never be dropped; the attempt budget lives in job_runs.
    max_retries = None
    params: ClassVar[type[BaseModel] | None] = None
    singleton: ClassVar[bool] = False
    max_attempts: ClassVar[int | None] = None

    @property
    def job_id(self) -> str:
        """The running job's id (== Celery task id)."""
        return str(self.request.id)

    def session(self) -> AbstractContextManager[Session]:
        """One transaction (commit on success) for the task's unit of work."""
        return session_scope()

    def parse_params(self, raw: Any) -> BaseModel:
        """Validate raw JSON params with the task's model."""
        assert self.params is not None, f"{self.name} has no params model"
        return self.params.model_validate(raw or {})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The message carries {"params": {...}}; `celery call` users may pass them bare.
        raw = args[0] if args else kwargs.get("params", kwargs)
        if isinstance(raw, BaseModel):
            raw = raw.model_dump(mode="json")
        if self.request.called_directly or self.request.id is None:
            return self.run(self.parse_params(raw))
        return self._run_job(raw)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        """A hard time limit kills the child before it can record anything; Celery calls this
        in the worker's main process, so the job is marked failed instead of staying running."""
        if isinstance(exc, TimeLimitExceeded):
            try:
                jobstore.fail(task_id, "failed", "time_limit",
                              f"hard time limit exceeded ({exc})")
            except Exception:
                log.exception("job.time_limit_not_recorded", job_id=task_id)

    # -- the job core ---------------------------------------------------------------------

    def _run_job(self, raw: dict[str, Any]) -> Any:
        job_id = self.job_id
        structlog.contextvars.bind_contextvars(job_id=job_id, job_type=self.name)
        try:
            return self._run_leased(job_id, raw)
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "job_type", "idempotency_key")

    def _retry_delivery(self, countdown: float, exc: BaseException | None = None) -> Retry:
        """Re-send this delivery later without spending an attempt (Celery's cap is off:
        the attempt budget lives in Postgres)."""
        return self.retry(countdown=countdown, exc=exc)

    def _run_leased(self, job_id: str, raw: dict[str, Any]) -> Any:
        settings = get_settings()
        try:
            lease = leases.acquire(job_lease_key(job_id))
        except redis.RedisError as exc:
            raise self._retry_delivery(backoff(self.request.retries + 1), exc) from exc
        if lease is None:
            # Another live process runs this job (a duplicate delivery): look again later.
            log.info("job.busy_elsewhere")
            raise self._retry_delivery(settings.lease_ttl / 2 + random.uniform(0, 1))
        single: leases.Lease | None = None
        try:
            if self.singleton:
                try:
                    single = leases.acquire(singleton_lease_key(self.name))
                except redis.RedisError as exc:
                    raise self._retry_delivery(backoff(self.request.retries + 1), exc) from exc
                if single is None:
                    log.info("job.singleton_busy")
                    raise self._retry_delivery(settings.lease_ttl + random.uniform(0, 2))
            worker = _worker_name(self.request)
            try:
                claim = jobstore.claim(job_id, self.name, raw, worker,
                                       self.max_attempts or settings.max_attempts)
            except Exception as exc:
                # Whatever stops the claim, the message must come back, or the job is lost.
                log.warning("job.claim_failed", error=describe(exc))
                raise self._retry_delivery(backoff(self.request.retries + 1), exc) from exc
            if claim.idempotency_key:
                structlog.contextvars.bind_contextvars(idempotency_key=claim.idempotency_key)
            if claim.action == "done":
                log.info("job.duplicate_delivery_skipped")
                return claim.result
            if claim.action in ("final", "dead"):
                log.warning("job.not_run", status=claim.status)
                raise Ignore()
            return self._execute(job_id, raw, claim, worker)
        finally:
            if single is not None:
                leases.release(single)
            leases.release(lease)

    def _execute(self, job_id: str, raw: dict[str, Any], claim: jobstore.Claim,
                 worker: str) -> Any:
        log.info("job.started", attempt=claim.attempts)
        try:
            params = self.parse_params(raw)
            result = self.run(params)
            if isinstance(result, BaseModel):
                result = result.model_dump(mode="json")
        except (Retry, Ignore, Reject):
            raise
        except ValidationError as exc:
            self._record(job_id, worker, "failed", "invalid_params", str(exc))
            raise
        except JobError as exc:
            self._record(job_id, worker, "failed", exc.code, str(exc))
            log.warning("job.failed", error_code=exc.code)
            raise
        except SoftTimeLimitExceeded as exc:
            self._record(job_id, worker, "failed", "time_limit", "soft time limit exceeded")
            raise exc
        except TRANSIENT_EXCEPTIONS as exc:
            return self._transient(job_id, worker, claim, exc)
        except Exception as exc:
            self._record(job_id, worker, "failed", "internal_error", describe(exc))
            log.exception("job.internal_error")
            raise
        try:
            jobstore.succeed(job_id, result, worker)
        except TRANSIENT_EXCEPTIONS as exc:
            # The effect committed but its record did not; a redelivery re-runs the
            # (idempotent) task and records it then.
            raise self._retry_delivery(backoff(claim.attempts), exc) from exc
        except Exception as exc:  # the result itself cannot be stored (e.g. not JSON-able)
            self._record(job_id, worker, "failed", "result_not_recorded", describe(exc))
            log.exception("job.result_not_recorded")
            raise
        log.info("job.succeeded", attempt=claim.attempts)
        return result

    def _transient(self, job_id: str, worker: str, claim: jobstore.Claim,
                   exc: BaseException) -> Any:
        code = f"transient:{type(exc).__name__}"
        if claim.attempts >= claim.max_attempts:
            self._record(job_id, worker, "dead", code, describe(exc))
            log.error("job.dead", attempts=claim.attempts, error_code=code)
            raise exc
        delay = backoff(claim.attempts)
        next_at = datetime.now(UTC) + timedelta(seconds=delay)
        self._record(job_id, worker, "retrying", code, describe(exc), next_at)
        log.warning("job.retrying", attempt=claim.attempts, delay=round(delay, 2), error_code=code)
        raise self._retry_delivery(delay, exc)

    def _record(self, job_id: str, worker: str, status: str, code: str, message: str,
                next_at: datetime | None = None) -> None:
        try:
            jobstore.fail(job_id, status, code, message, next_at, worker=worker)
        except Exception as exc:
            # Cannot record the outcome: run the job again later rather than lose it.
            raise self._retry_delivery(backoff(self.request.retries + 1), exc) from exc


def describe(exc: BaseException) -> str:
    """An error message fit for job_runs and Flower: the driver's first line, never the SQL
    statement and its parameters that SQLAlchemy appends."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
        inner = exc.orig
        first = (str(inner).strip().splitlines() or [""])[0]
        return f"{type(inner).__name__}: {first}"[:2000]
    return f"{type(exc).__name__}: {exc}"[:2000]


def _worker_name(request: Any) -> str:
    return f"{request.hostname or socket.gethostname()}:{os.getpid()}"

