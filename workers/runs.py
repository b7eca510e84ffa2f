"""A run: this process's ownership of one job, and the heartbeat that keeps it.

A claim (`jobstore.claim`) gives a run an owner token, a lease and a new epoch; from then on
everything the run commits is conditional on that epoch, so a run that lost the job (its
lease lapsed under a stall and another claim took it over) can change nothing. Two callers
own runs: the worker (workers.jobs.JobTask, one run per delivery) and the CLI's `--inline`
mode (cli/inline.py, a family's service in the CLI process with no broker). Both get the
same fence, the same outcome-with-the-effect commit and the same heartbeat from here, so a
fix to one (the heartbeat's quick retry after an outage) is a fix to both.

Imports nothing above the job store: no Celery, no Redis (an inline run has neither).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import event
from sqlalchemy.orm import Session

from workers import jobstore
from workers.db import get_sessionmaker
from workers.errors import OwnershipLost, describe
from workers.settings import get_settings

log = structlog.get_logger("warden.jobs")


@dataclass
class Run:
    """This process's ownership of one job: what every fenced write is conditional on."""

    job_id: str
    epoch: int
    owner: str
    attempts: int
    max_attempts: int
    lost: bool = False
    completed: bool = False  # the outcome committed (with the effect, via complete())
    pending_complete: bool = False  # complete() ran inside an open fenced transaction
    progress_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The job's id, what a family stores on its records (audit_runs.job_id, ...)."""
        return self.job_id

    def taken_over(self) -> OwnershipLost:
        """Flag the run lost and return the error to raise: another run owns the job now."""
        self.lost = True
        return OwnershipLost(f"job {self.job_id} epoch {self.epoch} was taken over")

    def check_owned(self) -> None:
        """Raise OwnershipLost once the run lost its job (the heartbeat or a fenced write
        found it taken over): nothing of it may commit any more. Long loops call it."""
        if self.lost:
            raise OwnershipLost(f"job {self.job_id} epoch {self.epoch} was taken over")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One fenced transaction: it commits only while this run still owns the job (the
        epoch check is its last statement, under the job row's lock)."""
        self.check_owned()
        s = get_sessionmaker()()

        def fence_before_commit(session: Session) -> None:
            # Every COMMIT of this session, the family's own s.commit() included, is fenced;
            # a transaction that carries the outcome (complete) is fenced by that UPDATE.
            if self.pending_complete or self.completed:
                return
            if not jobstore.fence(session, self.job_id, self.epoch):
                raise self.taken_over()

        event.listen(s, "before_commit", fence_before_commit)
        try:
            yield s
            if self.pending_complete:
                self._commit_with_outcome(s)
            elif s.in_transaction():  # (commit() of an unused session would begin one)
                s.commit()
        except BaseException:
            self.pending_complete = False
            s.rollback()
            raise
        finally:
            s.close()

    def _commit_with_outcome(self, s: Session) -> None:
        try:
            s.commit()
        except jobstore.RETRYABLE_DB_ERRORS as exc:
            # The COMMIT's answer was lost: the row says whether it happened. If not, the
            # effect rolled back with it, and running again is safe.
            if jobstore.recorded(self.job_id, self.epoch, "succeeded"):
                log.warning("job.commit_answer_lost_but_committed", error=describe(exc))
            else:
                raise
        self.completed = True
        self.pending_complete = False

    def complete(self, session: Session, result: Any) -> Any:
        """Record the job's success in this fenced transaction (call it last in a
        `session()` block): the family's effect and the outcome commit together or not at
        all. Returns the result as the job row stores it (JSON), which is what the queued
        command reads back and prints; ValueError if it cannot be stored (NaN, not JSON)."""
        encoded = jobstore.encode_result(result)
        if not session.in_transaction():
            # Nothing else in this transaction: the outcome alone, one autocommit statement.
            if not jobstore.succeed(self.job_id, self.epoch, result):
                raise self.taken_over()
            self.completed = True
            return json.loads(encoded)
        done = session.execute(jobstore.SUCCEED_SQL,
                               {"id": uuid.UUID(self.job_id), "e": self.epoch, "r": encoded})
        if getattr(done, "rowcount", 0) != 1:
            raise self.taken_over()
        self.pending_complete = True
        return json.loads(encoded)

    def progress(self, done: int, total: int | None = None, **extra: Any) -> None:
        """Store a long job's progress on its row (at most once a second, and always the
        last step), where the API and `warden job ID` show it; fenced like any write."""
        now = time.monotonic()
        if now - self.progress_at < 1.0 and (total is None or done < total):
            return
        self.progress_at = now
        payload = {"done": done, "total": total, **extra, "at": datetime.now(UTC).isoformat()}
        try:
            if not jobstore.save_progress(self.job_id, self.epoch, payload):
                self.lost = True
        except jobstore.RETRYABLE_DB_ERRORS as exc:  # progress is a hint; the work goes on
            log.warning("job.progress_not_saved", error=describe(exc))
        self.check_owned()


class Heartbeat:
    """One daemon thread per process extending the leases of the jobs it runs, at a third
    of WARDEN_LEASE_TTL. A job the heartbeat no longer finds owned (taken over after a
    stall) is flagged `lost`: its fenced writes fail, and check_owned() stops it."""

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def add(self, run: Run) -> None:
        """Heartbeat `run` from now on (starts the thread, again in a forked child)."""
        with self._lock:
            self._runs[run.job_id] = run
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="job-heartbeat",
                                                daemon=True)
                self._thread.start()

    def discard(self, run: Run) -> None:
        """Stop heartbeating `run` (it ended, whatever its outcome)."""
        with self._lock:
            if self._runs.get(run.job_id) is run:
                del self._runs[run.job_id]

    # After a failed heartbeat the next try comes this soon (not a third of the TTL later):
    # once the database is back, the lease is renewed before anyone may take the job over.
    RETRY_AFTER_ERROR = 0.5

    def _loop(self) -> None:
        wait = get_settings().lease_ttl / 3
        while True:
            time.sleep(wait)
            wait = get_settings().lease_ttl / 3
            with self._lock:
                runs = list(self._runs.values())
            if not runs:
                continue
            try:
                alive = jobstore.heartbeat((r.job_id, r.epoch) for r in runs)
            except Exception as exc:
                # Database away (a restart, a failover): the run goes on; its lease may
                # lapse, but nobody takes a lapsed job over before WARDEN_RELAY_LOST_AFTER
                # unless its owner is proven dead, and the renewal below restores it.
                log.warning("job.heartbeat_failed", error=describe(exc))
                wait = min(wait, self.RETRY_AFTER_ERROR)
                continue
            for run in runs:
                if run.job_id not in alive and not run.completed and not run.pending_complete:
                    with self._lock:
                        still_running = self._runs.get(run.job_id) is run
                    if still_running and not run.lost:
                        run.lost = True
                        log.error("job.ownership_lost", job_id=run.job_id, epoch=run.epoch)


# The process's one heartbeat thread: a worker's pool process and an inline CLI share it.
heartbeat = Heartbeat()
