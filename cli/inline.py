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
family's effect in one transaction (`InlineJob.complete`), as `JobTask.complete` does.

What keeps a worker from running an inline job:
- the row exists unclaimed only for the milliseconds between its insert and its claim; it
  is born published (the relay's outbox pass ignores it) and expires CLAIM_WINDOW seconds
  later (a claim after that cancels it), so a CLI killed in between leaves nothing to run;
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
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy.exc
import structlog
from pydantic import BaseModel, ValidationError
from sqlalchemy import text
from sqlalchemy.orm import Session

from workers import identity, jobstore
from workers.db import autocommit, get_sessionmaker
from workers.errors import JobError, OwnershipLost, TransientError
from workers.settings import get_settings

log = structlog.get_logger("warden.inline")

SOURCE = "cli-inline"
# Seconds an inline row may stay unclaimed: its claim follows its insert at once, so this
# only bounds what a CLI killed between the two leaves behind (a claim after it cancels).
CLAIM_WINDOW = 30.0
POLL_SECONDS = 1.0  # how often a singleton waiting for the running job of its type looks

# The errors a worker would retry; inline they end the run `failed` with this code prefix.
_TRANSIENT: tuple[type[BaseException], ...] = (
    TransientError, *jobstore.RETRYABLE_DB_ERRORS, ConnectionError, TimeoutError)


class InlineFailed(JobError):
    """The inline run ended without success; the message is the queued command's
    ("job ID failed: CODE: message"), so both read the same."""

    code = "inline_failed"


class InlineBusy(JobError):
    """Another job of the singleton type kept running past the command's --timeout."""

    code = "singleton_busy"


@dataclass
class InlineJob:
    """This process's run of one job: what its fenced writes are conditional on."""

    id: str
    type: str
    epoch: int
    lost: bool = False
    completed: bool = False
    pending_complete: bool = False
    _progress_at: float = 0.0

    def check_owned(self) -> None:
        """Raise OwnershipLost once the run lost its job (its lease lapsed and another
        claim fenced it): nothing of it may commit any more."""
        if self.lost:
            raise OwnershipLost(f"job {self.id} epoch {self.epoch} was taken over")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction that commits only while this run owns the job (the fence is its
        last statement, under the job row's lock), as a worker's `self.session()`."""
        self.check_owned()
        s = get_sessionmaker()()
        try:
            yield s
            if not self.pending_complete and not jobstore.fence(s, self.id, self.epoch):
                self.lost = True
                raise OwnershipLost(f"job {self.id} epoch {self.epoch} was taken over")
            try:
                s.commit()
            except jobstore.RETRYABLE_DB_ERRORS:
                # The COMMIT's answer was lost: the row says whether the outcome made it.
                if not (self.pending_complete
                        and jobstore.recorded(self.id, self.epoch, "succeeded")):
                    raise
            if self.pending_complete:
                self.completed = True
        except BaseException:
            self.pending_complete = False
            s.rollback()
            raise
        finally:
            s.close()

    def complete(self, session: Session, result: Any) -> Any:
        """Record the job's success in this transaction (call it last in a `session()`
        block): the family's effect and the outcome commit together or not at all. Returns
        the result as the job row stores it (JSON), which is what the queued command reads
        back and prints."""
        encoded = jobstore.encode_result(result)
        done = session.execute(jobstore.SUCCEED_SQL,
                               {"id": uuid.UUID(self.id), "e": self.epoch, "r": encoded})
        if getattr(done, "rowcount", 0) != 1:
            self.lost = True
            raise OwnershipLost(f"job {self.id} epoch {self.epoch} was taken over")
        self.pending_complete = True
        return json.loads(encoded)

    def progress(self, done: int, total: int | None = None, **extra: Any) -> None:
        """Store progress on the job row (at most once a second, and always the last step),
        where `warden job ID` shows it, as a worker's run does."""
        now = time.monotonic()
        if now - self._progress_at < 1.0 and (total is None or done < total):
            return
        self._progress_at = now
        payload = {"done": done, "total": total, **extra, "at": datetime.now(UTC).isoformat()}
        try:
            if not jobstore.save_progress(self.id, self.epoch, payload):
                self.lost = True
        except jobstore.RETRYABLE_DB_ERRORS:
            self._progress_at = 0.0  # progress is a hint; the work goes on
        self.check_owned()


class _Heartbeat:
    """Extends the run's lease every third of WARDEN_LEASE_TTL (a worker's heartbeat does
    the same), and flags the run lost when its row is no longer its own."""

    def __init__(self, job: InlineJob) -> None:
        self.job = job
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="inline-heartbeat",
                                        daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        interval = get_settings().lease_ttl / 3
        while not self._stop.wait(interval):
            try:
                alive = jobstore.heartbeat([(self.job.id, self.job.epoch)])
            except Exception as exc:  # database away: the lease gives slack; try again
                log.warning("inline.heartbeat_failed", job_id=self.job.id, error=_describe(exc))
                continue
            job = self.job
            if job.id not in alive and not job.completed and not job.pending_complete:
                job.lost = True


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
           echo: Callable[[str], None]) -> InlineJob:
    """Insert the run's row and claim it through the core's claim; a singleton whose type
    is running waits (with no row) for up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    owner, worker = identity.new_token(), _worker_name()
    said = False
    while True:
        job_id = uuid.uuid4()
        with autocommit() as conn:
            conn.execute(_INSERT, {"id": job_id, "t": job_type, "p": json.dumps(params),
                                   "src": SOURCE, "w": CLAIM_WINDOW})
        try:
            claim = jobstore.claim(str(job_id), job_type, params, owner, worker, 1,
                                   singleton=singleton)
        except BaseException:
            with contextlib.suppress(Exception), autocommit() as conn:
                conn.execute(_DROP_UNCLAIMED, {"id": job_id})
            raise
        if claim.action == "run":
            return InlineJob(str(job_id), job_type, claim.epoch)
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


def _describe(exc: BaseException) -> str:
    """The first line of what went wrong (the driver's message, never the SQL that
    SQLAlchemy appends), as the job core records it."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
        first = (str(exc.orig).strip().splitlines() or [""])[0]
        return f"{type(exc.orig).__name__}: {first}"[:2000]
    return f"{type(exc).__name__}: {exc}"[:2000]


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
        ) -> Iterator[InlineJob]:
    """Run one job of `job_type` in this process: the block does the family's work through
    `job.session()` and ends with `job.complete(session, result)` in its last transaction.

    `singleton`: the type's rule (one running job of the type per database), as its task
    declares it. `timeout`: how long a singleton waits for the running one to end.
    A failure is recorded on the job row (`failed`, with a worker's error code) and raised
    as InlineFailed ("job ID failed: CODE: message"); Ctrl-C is recorded `interrupted`.
    """
    job = _claim(job_type, params.model_dump(mode="json"), singleton=singleton,
                 timeout=timeout, echo=echo)
    with _Heartbeat(job):
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
            code, message = _code(exc), _describe(exc)
            # (The database away: the run's lease lapses, and the core's recovery applies.)
            with contextlib.suppress(Exception):
                jobstore.finish(job.id, job.epoch, "failed", code, message)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt: recorded; the CLI says "aborted"
            first = (message.splitlines() or [""])[0][:300]
            raise InlineFailed(f"job {job.id} failed: {code}: {first}") from exc
