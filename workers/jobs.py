"""JobTask: the base every Warden task runs on.

Per delivery: claim the job_runs row (a conditional UPDATE that gives this run an owner
token, a lease and a new epoch; a finished job is not run again; a job owned by a live run
is left to it), heartbeat the lease while the task runs, and record the outcome
conditional on the epoch. A family's effect and the job's outcome can commit in one fenced
transaction (`with self.session() as s: return self.complete(s, result)`), so a run that
lost the job can change nothing. ADR 0007 says what this covers and what it does not.
The run itself (its fenced session, complete, progress, heartbeat) is workers.runs, which
the CLI's --inline mode uses too; this module adds what a delivery needs around it.

No Celery retry(): it turns a failed publish into a dropped delivery. A retry is written to
job_runs first (retrying, due at T by the database's clock, unpublished); the worker then
sends the delayed message, and the relay sends it when due if the worker could not.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, ClassVar, NoReturn

import sqlalchemy.exc
import structlog
from celery import Task
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from pydantic import BaseModel, ValidationError
from sqlalchemy import text
from sqlalchemy.orm import Session

from workers import deployment, identity, jobstore
from workers.db import session_scope
from workers.enqueue import fan_out_children, publish
from workers.errors import TRANSIENT_EXCEPTIONS, JobError, OwnershipLost, describe
from workers.runs import Run, heartbeat
from workers.settings import get_settings

log = structlog.get_logger("warden.jobs")

# Set to 1 by the worker's main process when its shutdown begins (workers/app.py); created
# at import, before the pool forks, so every pool process shares it. A job the shutdown
# then terminates (SystemExit in the pool process) knows it was stopped, not broken.
SHUTTING_DOWN: Any = multiprocessing.Value("b", 0, lock=False)


def backoff(attempt: int, base: float | None = None, cap: float | None = None) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random, so a herd spreads out."""
    settings = get_settings()
    base = settings.retry_backoff_base if base is None else base
    cap = settings.retry_backoff_max if cap is None else cap
    delay = min(cap, base * (2 ** max(0, attempt - 1)))
    return delay / 2 + random.uniform(0, delay / 2)


class Suspended(BaseException):
    """A parent job handed its work to children and waits (not an error: BaseException so
    a family's `except Exception` cannot swallow it)."""


class JobTask(Task):
    """Base class of Warden tasks. Set `params` (a pydantic model) in the task decorator;
    `singleton=True` allows one running job of the type at a time."""

    abstract = True
    # How workers.celery_app.registered_job_tasks tells a job task (it imports nothing above
    # the Celery app).
    warden_job: ClassVar[bool] = True
    typing = False  # arguments are validated against `params`, not the signature
    max_retries = None  # Celery's retry machinery is not used (see the module docstring)
    params: ClassVar[type[BaseModel] | None] = None
    singleton: ClassVar[bool] = False
    max_attempts: ClassVar[int | None] = None
    # Who may submit it (workers/scopes.py checks it wherever a principal submits): the API
    # token scope the type needs, and params that raise it to admin (any of them with the
    # value named here, e.g. {"fix": True}). Destructive and operator types say "admin".
    scope: ClassVar[str] = "enqueue"
    admin_when: ClassVar[dict[str, Any] | None] = None
    _local = threading.local()

    @classmethod
    def required_scope(cls, params: BaseModel | Mapping[str, Any] | None = None) -> str:
        """The scope submitting this type with these params needs; without params, the
        scope it needs whatever the params are."""
        if cls.scope == "admin" or not cls.admin_when or params is None:
            return cls.scope
        values = params.model_dump() if isinstance(params, BaseModel) else params
        raised = any(k in values and values[k] == v for k, v in cls.admin_when.items())
        return "admin" if raised else cls.scope

    # -- what a task body uses ----------------------------------------------------------------

    @property
    def job_id(self) -> str:
        """The running job's id (== Celery task id)."""
        return str(self.request.id)

    @property
    def _run(self) -> Run | None:
        run: Run | None = getattr(self._local, "run", None)
        return run if run is not None and run.job_id == str(self.request.id) else None

    def session(self) -> AbstractContextManager[Session]:
        """One fenced transaction: it commits only while this run still owns the job (the
        epoch check is its last statement, under the job row's lock; workers.runs). Outside
        a worker (a unit test calling the task) a plain transaction."""
        run = self._run
        if run is None:
            return session_scope()
        return run.session()

    def complete(self, session: Session, result: Any) -> Any:
        """Record the job's success in this fenced transaction and return `result`: the
        effect and the outcome commit together or not at all. Call it last in the block."""
        run = self._run
        if run is None:
            return result
        if isinstance(result, BaseModel):
            result = result.model_dump(mode="json")
        run.complete(session, result)
        return result

    def check_owned(self) -> None:
        """Raise OwnershipLost when another run took this job over (long loops call it)."""
        run = self._run
        if run is not None:
            run.check_owned()

    def progress(self, done: int, total: int | None = None, **extra: Any) -> None:
        """Store a long job's progress (at most once a second, and always the last step)."""
        run = self._run
        if run is not None:
            run.progress(done, total, **extra)

    def fan_out(self, build: Callable[[], list[tuple[str, dict[str, Any]]]]
                ) -> list[jobstore.Child]:
        """Hand the work to child jobs and wait for them; once all have ended, the same call
        (in the parent's next run) returns them. See docs/job-core.md."""
        run = self._run
        if run is None:
            raise RuntimeError("fan_out needs a worker (a job run), not a direct call")
        total, pending = jobstore.fan_out_state(run.job_id)
        if total and not pending:
            return jobstore.children(run.job_id)
        if total:  # delivered while children still run (a stray duplicate): wait again
            self._suspend(run)
            return jobstore.children(run.job_id)  # the last child ended meanwhile
        specs = build()
        if not specs:
            return []
        created = fan_out_children(run.job_id, run.epoch, specs)
        if created is None:
            raise run.taken_over()
        log.info("job.fanned_out", children=len(created))
        raise Suspended()

    def _suspend(self, run: Run) -> None:
        """Back to waiting, unless the last child ended since we looked (then return and
        let the caller read the children)."""
        with session_scope() as s:
            parked = s.execute(
                text("UPDATE job_runs SET status='waiting', lease_expires_at=NULL, "
                     "attempts=attempts-1 WHERE id=:id AND epoch=:e AND status='running' "
                     "AND children_pending > 0 RETURNING 1"),
                {"id": run.job_id, "e": run.epoch}).first()
            if parked is None:
                owned = s.execute(text("SELECT 1 FROM job_runs WHERE id=:id AND epoch=:e "
                                       "AND status='running'"),
                                  {"id": run.job_id, "e": run.epoch}).first()
                if owned is None:
                    raise run.taken_over()
                return
        raise Suspended()

    def parse_params(self, raw: Any) -> BaseModel:
        """Validate raw JSON params with the task's model."""
        assert self.params is not None, f"{self.name} has no params model"
        return self.params.model_validate(raw or {})

    # -- Celery entry points ------------------------------------------------------------------

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
        """A hard time limit kills the pool child before it can record anything; Celery calls
        this in the worker's main process, which records `time_limit` once the child is
        provably dead (conditional on the epoch it saw)."""
        if isinstance(exc, TimeLimitExceeded):
            # Billiard calls this BEFORE it kills the child (TimeoutHandler.on_hard_timeout:
            # handle_timeout, then _trywaitkill): wait for the death off the event loop.
            threading.Thread(target=_record_time_limit, args=(task_id, str(exc)),
                             name="time-limit", daemon=True).start()

    # -- the job core ---------------------------------------------------------------------

    def _run_job(self, raw: Any) -> Any:
        job_id = self.job_id
        structlog.contextvars.bind_contextvars(job_id=job_id, job_type=self.name)
        try:
            return self._deliver(job_id, raw)
        finally:
            self._local.run = None
            structlog.contextvars.unbind_contextvars("job_id", "job_type", "idempotency_key")

    def _deliver(self, job_id: str, raw: Any) -> Any:
        settings = get_settings()
        worker = _worker_name(self.request)
        owner = identity.new_token()
        stamp = _stamp_of(self.request)
        try:
            mine = deployment.identity()
            if stamp is not None and stamp != mine:
                # Accepted into another database (a CLI pointed at a restored copy, another
                # stack on this Redis): running it here would act on the wrong data.
                log.error("job.wrong_deployment", stamped=stamp, this_deployment=mine)
                raise Reject(f"message for deployment {stamp}, this is {mine}",
                             requeue=False)
            claim = jobstore.claim(job_id, self.name, raw, owner, worker,
                                   self.max_attempts or settings.max_attempts,
                                   singleton=self.singleton,
                                   adopt=stamp is None and settings.adopt_bare_messages)
        except jobstore.RETRYABLE_DB_ERRORS as exc:
            # Postgres unreachable past the retry budget: the message must come back.
            log.error("job.claim_failed", error=describe(exc))
            time.sleep(min(5.0, backoff(1)))
            raise Reject(exc, requeue=True) from exc
        except sqlalchemy.exc.DBAPIError as exc:
            # An error the database gave this claim that no retry on a fresh connection
            # cures (a bug, a server that lacks a feature): never drop what may be the only
            # copy of the message. Sent again later, loudly, every time.
            log.error("job.claim_error", error=describe(exc), exc_info=True)
            self._later(job_id, raw, settings.relay_lost_after, defer=False, exc=exc,
                        requeue_if_unsent=True)
        except ValueError as exc:
            # A task id that is no job id: no row can ever match it; requeueing would loop.
            log.error("job.claim_error", error=describe(exc))
            raise Reject(exc, requeue=False) from exc
        if claim.idempotency_key:
            structlog.contextvars.bind_contextvars(idempotency_key=claim.idempotency_key)
        if claim.action == "foreign":
            log.error("job.refused_bare_message", stamped=stamp,
                      hint="no job row: sent past the enqueue path or for another database; "
                           "WARDEN_ADOPT_BARE_MESSAGES=true adopts bare `celery call` messages")
            raise Reject("no job row for this message", requeue=False)
        if claim.action == "done":
            log.info("job.duplicate_delivery_skipped")
            return claim.result
        if claim.action == "early":
            # A copy that came before the job is due: send it again for the due time (the
            # row's own message may be this one, sent by a clock ahead of the database's).
            log.info("job.early_delivery_deferred", due_in=round(claim.due_in, 2))
            self._later(job_id, raw, claim.due_in, defer=False)
        if claim.action == "singleton_busy":
            log.info("job.singleton_busy")
            self._later(job_id, raw, settings.lease_ttl + random.uniform(0, 2), defer=True)
        if claim.action != "run":
            # final, dead, waiting: nothing to do. busy: a live run owns it; if that run
            # dies, its lease lapses and the relay sends the job again.
            log.info("job.not_run", action=claim.action, status=claim.status)
            raise Ignore()
        run = Run(job_id, claim.epoch, owner, claim.attempts, claim.max_attempts)
        self._local.run = run
        heartbeat.add(run)
        try:
            return self._execute(run, raw)
        finally:
            heartbeat.discard(run)

    def _give_back(self, run: Run) -> None:
        try:
            given = jobstore.give_back(run.job_id, run.epoch)
            log.warning("job.given_back_on_shutdown", given_back=given, attempt=run.attempts)
        except BaseException as err:  # the process is exiting: never mask that
            log.warning("job.give_back_failed", error=describe(err))

    def _later(self, job_id: str, raw: Any, delay: float, *, defer: bool,
               exc: BaseException | None = None, requeue_if_unsent: bool = False) -> NoReturn:
        """Deliver this job again in `delay` s: the row says so first (so the relay sends it
        if this send fails), then the delayed message; ends this delivery as a retry.
        `requeue_if_unsent`: nothing in the row says so (a claim that failed), so if the
        send fails this copy goes back to the queue instead of being acked."""
        if defer:
            try:
                jobstore.defer(job_id, delay)
            except Exception as err:
                log.warning("job.defer_failed", error=describe(err))
                time.sleep(min(5.0, delay))
                raise Reject(err, requeue=True) from err
        params = raw if isinstance(raw, dict) else {}
        if not publish(job_id, self.name, params, countdown=delay, force=True) \
                and requeue_if_unsent:
            time.sleep(min(5.0, delay))
            raise Reject("the delayed copy could not be sent", requeue=True)
        raise Retry(f"again in {delay:.1f}s", exc, when=delay)

    def _execute(self, run: Run, raw: Any) -> Any:
        log.info("job.started", attempt=run.attempts, epoch=run.epoch)
        try:
            params = self.parse_params(raw)
            result = self.run(params)
            if isinstance(result, BaseModel):
                result = result.model_dump(mode="json")
        except (Retry, Ignore, Reject):
            raise
        except Suspended:
            raise Ignore() from None
        except OwnershipLost:
            log.error("job.ownership_lost", epoch=run.epoch)
            raise Ignore() from None
        except BaseException as exc:
            if run.completed:
                # The outcome committed with the effect; what failed afterwards changes nothing.
                log.warning("job.error_after_complete", error=describe(exc))
                raise Ignore() from None
            if not isinstance(exc, Exception):
                # SystemExit, KeyboardInterrupt: the worker is going away. Stopped by its
                # shutdown, the run gives its attempt back (a crash still spends it).
                if isinstance(exc, SystemExit) and SHUTTING_DOWN.value:
                    self._give_back(run)
                raise
            self._failed(run, raw, exc)
            raise
        if run.completed:
            log.info("job.succeeded", attempt=run.attempts)
            return result
        try:
            recorded = jobstore.succeed(run.job_id, run.epoch, result)
        except ValueError as exc:  # the result itself cannot be stored (NaN, not JSON-able)
            self._record(run, "failed", "result_not_recorded", describe(exc))
            log.exception("job.result_not_recorded")
            raise
        except Exception as exc:
            # Postgres away past the retry budget: the lease lapses and the relay sends the
            # job again; ack this delivery.
            log.error("job.outcome_not_recorded", error=describe(exc))
            raise Ignore() from exc
        if not recorded:
            log.error("job.ownership_lost", epoch=run.epoch)
            raise Ignore()
        log.info("job.succeeded", attempt=run.attempts)
        return result

    def _failed(self, run: Run, raw: Any, exc: BaseException) -> None:
        """Record why the run failed, by kind (module docstring of workers.errors)."""
        if isinstance(exc, ValidationError):
            self._record(run, "failed", "invalid_params", str(exc))
        elif isinstance(exc, JobError):
            self._record(run, "failed", exc.code, str(exc))
            log.warning("job.failed", error_code=exc.code)
        elif isinstance(exc, SoftTimeLimitExceeded):
            self._record(run, "failed", "time_limit", "soft time limit exceeded")
        elif isinstance(exc, TRANSIENT_EXCEPTIONS):  # workers.errors: one classification
            self._transient(run, raw, exc)
        else:
            self._record(run, "failed", "internal_error", describe(exc))
            log.exception("job.internal_error")

    def _transient(self, run: Run, raw: Any, exc: BaseException) -> None:
        code = f"transient:{type(exc).__name__}"
        if run.attempts >= run.max_attempts:
            self._record(run, "dead", code, describe(exc))
            log.error("job.dead", attempts=run.attempts, error_code=code)
            return
        delay = backoff(run.attempts)
        if self._record(run, "retrying", code, describe(exc), delay):
            log.warning("job.retrying", attempt=run.attempts, delay=round(delay, 2),
                        error_code=code)
            self._later(run.job_id, raw, delay, defer=False, exc=exc)

    def _record(self, run: Run, status: str, code: str, message: str,
                retry_in: float | None = None) -> bool:
        """An error outcome, conditional on the epoch; False (and this delivery acked) when
        it could not or need not be written."""
        try:
            if jobstore.finish(run.job_id, run.epoch, status, code, message, retry_in):
                return True
            log.error("job.ownership_lost", epoch=run.epoch)
        except Exception as err:
            # Postgres away past the retry budget: the lease lapses and the relay sends the
            # job again (nothing of this run committed with an outcome).
            log.error("job.outcome_not_recorded", status=status, error=describe(err))
        raise Ignore()


def _record_time_limit(task_id: str, why: str) -> None:
    try:
        if not jobstore.fail_if_owner_dead(task_id, "time_limit",
                                           f"hard time limit exceeded ({why})", wait=60.0):
            log.warning("job.time_limit_not_recorded", job_id=task_id)
    except Exception:
        log.exception("job.time_limit_not_recorded", job_id=task_id)


def _stamp_of(request: Any) -> str | None:
    """The deployment a message was stamped for (None: a bare `celery call`, or a message
    from before stamping)."""
    value = getattr(request, deployment.STAMP_HEADER, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(deployment.STAMP_HEADER)
    return str(value) if value else None


def _worker_name(request: Any) -> str:
    return f"{request.hostname or socket.gethostname()}:{os.getpid()}"
