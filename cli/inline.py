"""`--inline`: run a job family's service in this process, against the database this CLI is
configured for (WARDEN_DATABASE_URL). No broker, no worker, no Redis connection.

Why: a command that submits a job writes the row into the database it is pointed at, but
the message goes to the deployment's broker, and whoever consumes it runs the job against
*its* database (operator drill D1: `WARDEN_DATABASE_URL=<copy> warden audit --fix` fixed
the live database). Inline, there is no message: the service runs here, on this database,
and the command prints and exits as the queued command does.

What an inline run stores: a job_runs row of the job's type, as a worker's run has one
(source `cli-inline`, worker `cli-inline@<host>:<pid>`), so the family's records
(audit_runs.job_id, validation_sweeps.job_id, health_reports.job_id) point at a real job
that `warden job ID` shows with its result. The row goes through the core's own claim
(`jobstore.claim`): for a singleton type under the type's advisory lock, so an inline audit
and a worker's audit never run at once on one database; the lease is heartbeated from a
thread here; every commit is fenced by the run's epoch and the outcome commits with the
family's effect in one transaction (`Run.complete`). The run, its fenced session and its
heartbeat are the worker's own (workers/runs.py), so both behave alike by construction.

What keeps a worker from running an inline job:
- the row exists unclaimed only for the milliseconds between its insert and its claim; it
  is born published (the relay's outbox pass ignores it) and expires CLAIM_WINDOW seconds
  later (less: always under WARDEN_RELAY_LOST_AFTER; a claim after that cancels it), so a
  CLI killed in between leaves nothing to run;
- a singleton claim that finds another job of the type running deletes the row again and
  waits with no row at all (a waiting row would be re-sent by the relay as lost);
- one attempt (max_attempts 1): a failure is recorded `failed` with its code and shown to
  the operator, never retried behind their back. A CLI killed mid-run (SIGKILL) leaves a
  run whose owner is gone, like a dead worker's: the core's recovery of lapsed runs
  applies to it, in this database only (a worker runs only its own database's jobs).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import text

from workers import identity, jobstore
from workers.db import autocommit
from workers.errors import TRANSIENT_EXCEPTIONS, JobError, OwnershipLost, describe
from workers.runs import Run, heartbeat

SOURCE = "cli-inline"
# Seconds an inline row may stay unclaimed: its claim follows its insert at once, so this
# only bounds what a CLI killed between the two leaves behind (a claim after it cancels).
CLAIM_WINDOW = 30.0


def _claim_window() -> float:
    """CLAIM_WINDOW, but always shorter than WARDEN_RELAY_LOST_AFTER: the row is born
    published, so past that the relay may send it as a lost message, and a worker's claim
    must then find it expired (cancelled), never run it (adversarial review)."""
    from workers.settings import get_settings

    return min(CLAIM_WINDOW, get_settings().relay_lost_after / 2)


POLL_SECONDS = 1.0  # how often a singleton waiting for the running job of its type looks

# The errors a worker would retry; inline they end the run `failed` with this code prefix.
# The worker's classification (workers.errors), so both record the same code.
_TRANSIENT: tuple[type[BaseException], ...] = (*TRANSIENT_EXCEPTIONS,
                                              *jobstore.RETRYABLE_DB_ERRORS)


class InlineFailed(JobError):
    """The inline run ended without success; the message is the queued command's
    ("job ID failed: CODE: message"), so both read the same."""

    code = "inline_failed"


class InlineBusy(JobError):
    """Another job of the singleton type kept running past the command's --timeout."""

    code = "singleton_busy"


def _worker_name() -> str:
    return f"{SOURCE}@{socket.gethostname()}:{os.getpid()}"


_INSERT = text(
    "INSERT INTO job_runs (id, type, params, max_attempts, source, published_at, expires_at) "
    "VALUES (:id, :t, CAST(:p AS jsonb), 1, :src, now(), now() + make_interval(secs => :w))")
# Only a row this process inserted and nobody claimed: never a job that ran.
_DROP_UNCLAIMED = text(
    "DELETE FROM job_runs WHERE id = :id AND status = 'queued' AND started_at IS NULL")
_HOLDER = text(
    "SELECT id FROM job_runs WHERE type = :t AND status = 'running' AND id <> :id "
    "ORDER BY started_at LIMIT 1")


def _claim(job_type: str, params: dict[str, Any], *, singleton: bool, timeout: float,
           echo: Callable[[str], None]) -> Run:
    """Insert the run's row and claim it through the core's claim; a singleton whose type
    is running waits (with no row) for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    owner, worker = identity.new_token(), _worker_name()
    said = False
    while True:
        job_id = uuid.uuid4()
        with autocommit() as conn:
            conn.execute(_INSERT, {"id": job_id, "t": job_type, "p": json.dumps(params),
                                   "src": SOURCE, "w": _claim_window()})
        try:
            claim = jobstore.claim(str(job_id), job_type, params, owner, worker, 1,
                                   singleton=singleton)
        except BaseException:
            with contextlib.suppress(Exception), autocommit() as conn:
                conn.execute(_DROP_UNCLAIMED, {"id": job_id})
            raise
        if claim.action == "run":
            return Run(str(job_id), claim.epoch, owner, claim.attempts, claim.max_attempts)
        with autocommit() as conn:
            conn.execute(_DROP_UNCLAIMED, {"id": job_id})
            holder = conn.execute(_HOLDER, {"t": job_type, "id": job_id}).scalar()
        if claim.action != "singleton_busy":
            raise InlineFailed(f"job {job_id} could not be started here: {claim.action} "
                               f"({claim.status})")
        if time.monotonic() + POLL_SECONDS > deadline:
            raise InlineBusy(f"{job_type} job {holder} is still running on this database "
                             f"after {timeout:.0f}s (one at a time); run again once it has "
                             f"ended (see `warden job {holder}`)")
        if not said:
            echo(f"waiting: {job_type} job {holder} is running on this database "
                 f"(one at a time) ...")
            said = True
        time.sleep(POLL_SECONDS)


def _code(exc: BaseException) -> str:
    """The error code a worker would record (by kind, workers/errors.py)."""
    if isinstance(exc, ValidationError):
        return "invalid_params"
    if isinstance(exc, JobError):
        return exc.code
    if isinstance(exc, _TRANSIENT):
        return f"transient:{type(exc).__name__}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "internal_error"


@contextmanager
def run(job_type: str, params: BaseModel, *, singleton: bool = False,
        timeout: float = 3600.0, echo: Callable[[str], None] = lambda _: None
        ) -> Iterator[Run]:
    """Run one job of `job_type` in this process: the block does the family's work through
    `job.session()` and ends with `job.complete(session, result)` in its last transaction.

    `singleton`: the type's rule (one running job of the type per database), as its task
    declares it. `timeout`: how long a singleton waits for the running one to end.
    A failure is recorded on the job row (`failed`, with a worker's error code) and raised
    as InlineFailed ("job ID failed: CODE: message"); Ctrl-C is recorded `interrupted`.
    """
    job = _claim(job_type, params.model_dump(mode="json"), singleton=singleton,
                 timeout=timeout, echo=echo)
    # The lease is extended every third of WARDEN_LEASE_TTL (within 0.5 s after a failed
    # try), and the run flagged lost when its row is no longer its own, as a worker's.
    heartbeat.add(job)
    try:
        yield job
        if not job.completed:
            raise RuntimeError(f"inline {job_type} ended without recording its outcome")
    except BaseException as exc:
        if job.completed or isinstance(exc, (GeneratorExit, SystemExit)):
            raise
        if isinstance(exc, OwnershipLost):
            raise InlineFailed(f"job {job.id} was taken over while it ran here (its lease "
                               "lapsed); nothing of this run was committed") from exc
        code, message = _code(exc), describe(exc)
        # (The database away: the run's lease lapses, and the core's recovery applies.)
        with contextlib.suppress(Exception):
            jobstore.finish(job.id, job.epoch, "failed", code, message)
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt: recorded; the CLI says "aborted"
        first = (message.splitlines() or [""])[0][:300]
        raise InlineFailed(f"job {job.id} failed: {code}: {first}") from exc
    finally:
        heartbeat.discard(job)
