"""Data migrations: the batch runner, its state, and the operator's controls. No Celery.

A run (`run`) is a loop of batches, each one transaction that (1) locks the migration's
state row, (2) checks the run still owns the migration (status `running`, this job), (3)
selects the next keyset batch after the stored cursor, (4) transforms it, and (5) stores
the new cursor and the batch's record. The cursor and the batch's effect commit together,
so a run killed anywhere resumes at the last committed batch and never applies one twice.
In a worker each transaction is the job core's fenced `self.session()`: a run that lost its
job cannot commit a batch.

Why the state row is the arbiter: pause, resume, cancel and a second run of the same
migration all change that row under its lock, so a batch either commits before the
operator's change or sees it and stops. A paused run ends its job (no lock, no worker);
resuming enqueues a new run that starts at the cursor, in the transaction that marks the
migration queued (a state `queued` always names a job that will run it; review N6). A
migration left `queued` with no live job (by the two-transaction resume of earlier
versions) shows as failed, and retry starts it again.

The rest: the batch size adapts to WARDEN_MIGRATION_BATCH_SECONDS; a statement or lock
timeout splits the batch in half; transient errors retry the batch with backoff, up to
WARDEN_MIGRATION_BATCH_ATTEMPTS; then the migration is `failed` (job failed,
`migration_failed`) until a retry resumes it. Before each batch the migration's health
checks may throttle the run; each throttle and each operator pause is recorded with its
reason and duration. The migration succeeds only when its verify step counts zero rows.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy.exc
import structlog
from sqlalchemy import text
from sqlalchemy.engine import RowMapping
from sqlalchemy.orm import Session

from tasks.data_migrations import registry
from tasks.data_migrations.registry import Batch, Context, Migration
from workers import oplog
from workers.db import session_scope
from workers.errors import JobError, TransientError
from workers.jobs import backoff, describe
from workers.settings import get_settings

log = structlog.get_logger("warden.data_migrations")

# Postgres SQLSTATEs of a statement cancelled by statement_timeout, and of lock_timeout.
TIMEOUT_STATES = frozenset({"57014", "55P03"})
# The adaptive size aims at this share of the batch time budget, and moves at most by these
# factors per batch: one slow batch (a cold cache, a big JSON list) must not halve the rate.
TARGET_SHARE = 0.5
GROW_AT_MOST, SHRINK_AT_MOST = 1.5, 0.5
# First throttle re-check after this many seconds, doubling up to the settings' cap.
THROTTLE_FIRST_WAIT = 0.5
REJECT_SAMPLE = 20  # rejects listed in a dry run's result
FINAL_JOB_STATUSES = ("failed", "dead", "cancelled")

STATE_COLUMNS = (
    "name, status, run_no, cursor, rows_done, rows_total, rows_changed, rejected, "
    "batches_done, batch_size, attempts, max_attempts, last_error, last_error_at, "
    "seconds_running, seconds_paused, seconds_throttled, longest_batch_seconds, "
    "verify_remaining, job_id, started_at, finished_at, changed_at, updated_at"
)


class MigrationFailed(JobError):
    """The migration stopped on an error past its budget (its state says which batch)."""

    code = "migration_failed"


class MigrationUnknown(JobError):
    """No registered migration has that name."""

    code = "unknown_migration"


class MigrationConflict(JobError):
    """The migration's state does not allow the operation (e.g. resume while running)."""

    code = "migration_conflict"


def _migration(name: str) -> Migration:
    try:
        return registry.get(name)
    except KeyError as exc:
        raise MigrationUnknown(str(exc.args[0])) from None


# -- state --------------------------------------------------------------------------------


def ensure_state(session: Session, name: str) -> None:
    """The migration's state row, created `pending` on first use."""
    session.execute(
        text("INSERT INTO data_migrations (name, max_attempts) VALUES (:n, :m) "
             "ON CONFLICT (name) DO NOTHING"),
        {"n": name, "m": get_settings().migration_max_attempts},
    )


def state(session: Session, name: str, *, lock: bool = False) -> RowMapping:
    """The state row (locked FOR UPDATE when asked), created if missing."""
    _migration(name)
    ensure_state(session, name)
    return session.execute(
        text(f"SELECT {STATE_COLUMNS} FROM data_migrations WHERE name = :n"
             + (" FOR UPDATE" if lock else "")),
        {"n": name},
    ).mappings().one()


def _job_row(session: Session, job_id: Any) -> RowMapping | None:
    if job_id is None:
        return None
    return session.execute(
        text("SELECT id, status, created_at, error_code, error_message FROM job_runs "
             "WHERE id = :id"),
        {"id": uuid.UUID(str(job_id))},
    ).mappings().first()


# The states in which a pass moves towards its end, so an ETA means something.
ETA_STATUSES = ("queued", "running")


def _effective_status(row: RowMapping, job: RowMapping | None) -> str:
    """A run whose job ended without recording the migration's outcome (dead after
    transient errors, killed by the time limit) leaves the state `running`: it has failed.
    So has a `queued` migration whose job is gone or already ended: nothing will run it."""
    if row["status"] in ("running", "queued") and job is not None \
            and job["status"] in FINAL_JOB_STATUSES:
        return "failed"
    if _queued_without_run(row, job):
        return "failed"
    return str(row["status"])


def _queued_without_run(row: RowMapping, job: RowMapping | None) -> bool:
    """`queued`, and no job that is still to run it (none, or one that succeeded: the
    previous run, when an earlier version's resume committed the state but not the job)."""
    return row["status"] == "queued" and (job is None or job["status"] == "succeeded")


def _rate(row: RowMapping) -> tuple[float | None, float | None]:
    """(rows per second of running time, seconds left): paused and throttled time is not
    running time, so neither counts in the rate or the ETA."""
    done, running = int(row["rows_done"]), float(row["seconds_running"])
    if done <= 0 or running <= 0:
        return None, None
    rate = done / running
    total = row["rows_total"]
    eta = max(0.0, (int(total) - done) / rate) if total is not None else None
    return rate, eta


def summary(session: Session, name: str) -> dict[str, Any]:
    """One migration as the API and CLI show it: state, progress, rate, ETA, last error."""
    m = _migration(name)
    row = state(session, name)
    job = _job_row(session, row["job_id"])
    status = _effective_status(row, job)
    rate, eta = _rate(row)
    total = row["rows_total"]
    last_error = row["last_error"]
    if _queued_without_run(row, job):
        last_error = ("queued, but no job is to run it (" + (
            f"job {job['id']} {job['status']}" if job is not None else "no job")
            + "); retry starts a run at the checkpoint")
    elif status == "failed" and row["status"] != "failed" and job is not None:
        last_error = f"job {job['status']}: {job['error_code']}: {job['error_message']}"
    open_pause = session.execute(
        text("SELECT kind, reason, actor, started_at FROM data_migration_pauses "
             "WHERE migration = :n AND ended_at IS NULL ORDER BY id DESC LIMIT 1"),
        {"n": name},
    ).mappings().first()
    return {
        "name": name,
        "description": m.description,
        "reversible": m.reverse is not None,
        "status": status,
        "run_no": row["run_no"],
        "cursor": row["cursor"],
        "rows_done": row["rows_done"],
        "rows_total": total,
        "percent": round(100.0 * row["rows_done"] / total, 1) if total else None,
        "rows_changed": row["rows_changed"],
        "rejected": row["rejected"],
        "batches_done": row["batches_done"],
        "batch_size": row["batch_size"],
        "attempts": row["attempts"],
        "max_attempts": row["max_attempts"],
        # A succeeded pass has no current error: one from an earlier attempt shown beside
        # "succeeded" read as a failure (drill D5); the batches keep their own errors.
        "last_error": None if status == "succeeded" else last_error,
        "last_error_at": None if status == "succeeded" else row["last_error_at"],
        "seconds_running": round(float(row["seconds_running"]), 3),
        "seconds_paused": round(float(row["seconds_paused"]), 3),
        "seconds_throttled": round(float(row["seconds_throttled"]), 3),
        "rows_per_second": round(rate, 1) if rate is not None else None,
        # Only a pass that is moving has an ETA (paused, cancelled, failed: none, drill D5).
        "eta_seconds": round(eta, 1) if eta is not None and status in ETA_STATUSES else None,
        "longest_batch_seconds": round(float(row["longest_batch_seconds"]), 4),
        "verify_remaining": row["verify_remaining"],
        "job_id": str(row["job_id"]) if row["job_id"] else None,
        "job_status": job["status"] if job is not None else None,
        "paused": dict(open_pause) if open_pause is not None else None,
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "updated_at": row["updated_at"],
    }


def list_migrations(session: Session) -> list[dict[str, Any]]:
    """Every registered migration with its state."""
    return [summary(session, name) for name in registry.names()]


def batches(session: Session, name: str, *, limit: int = 50,
            status: str | None = None) -> list[dict[str, Any]]:
    """The newest batch records (bounds, rows, lock time, attempts, error)."""
    _migration(name)
    rows = session.execute(
        text("SELECT id, run_no, batch_no, lower_id, upper_id, size, rows_changed, rejected, "
             "status, attempts, seconds, error, job_id, created_at "
             "FROM data_migration_batches WHERE migration = :n "
             "AND (CAST(:st AS varchar) IS NULL OR status = :st) ORDER BY id DESC LIMIT :l"),
        {"n": name, "l": limit, "st": status},
    ).mappings().all()
    return [dict(r) for r in rows]


def pauses(session: Session, name: str, *, limit: int = 50) -> list[dict[str, Any]]:
    """The newest pauses, operator and throttle, with reason and duration."""
    _migration(name)
    rows = session.execute(
        text("SELECT id, kind, reason, actor, started_at, ended_at, seconds, job_id "
             "FROM data_migration_pauses WHERE migration = :n ORDER BY id DESC LIMIT :l"),
        {"n": name, "l": limit},
    ).mappings().all()
    return [dict(r) for r in rows]


def rejects(session: Session, name: str, *, limit: int = 100,
            after_id: int | None = None) -> list[dict[str, Any]]:
    """Records the migration could not migrate: row (character), position, reason, record."""
    _migration(name)
    rows = session.execute(
        text("SELECT id, run_no, row_id, position, reason, record, created_at "
             "FROM data_migration_rejects WHERE migration = :n AND id > :after "
             "ORDER BY id LIMIT :l"),
        {"n": name, "l": limit, "after": after_id or 0},
    ).mappings().all()
    return [dict(r) for r in rows]


# -- operator controls (the caller commits; the API and CLI enqueue what they return) -----


def _close_open_pauses(session: Session, name: str, kind: str) -> float:
    """End the open pauses of `kind`; their seconds."""
    row = session.execute(
        text("UPDATE data_migration_pauses SET ended_at = now(), "
             "seconds = extract(epoch FROM now() - started_at) "
             "WHERE migration = :n AND kind = :k AND ended_at IS NULL "
             "RETURNING seconds"),
        {"n": name, "k": kind},
    ).scalars().all()
    return float(sum(row))


def pause(session: Session, name: str, *, actor: str, reason: str) -> dict[str, Any]:
    """Stop a queued or running migration after its current batch; recorded with reason."""
    oplog.record(session, actor=actor, action="migration.pause", target=name, reason=reason)
    row = state(session, name, lock=True)
    if row["status"] not in ("queued", "running"):
        raise MigrationConflict(f"{name} is {row['status']}; only a queued or running "
                                "migration can be paused")
    # changed_at is the moment of the change (after the state lock), not now(): this
    # transaction may have begun before a handover queued a successor, and a decision dated
    # before that successor would be undone by it (_claim: the latest decision wins).
    session.execute(
        text("UPDATE data_migrations SET status = 'paused', changed_at = clock_timestamp(), "
             "updated_at = now() WHERE name = :n"), {"n": name})
    session.execute(
        text("INSERT INTO data_migration_pauses (migration, kind, reason, actor, job_id) "
             "VALUES (:n, 'operator', :r, :a, :j)"),
        {"n": name, "r": reason.strip(), "a": actor[:100], "j": row["job_id"]},
    )
    log.info("migration.paused", migration=name, actor=actor, reason=reason)
    return summary(session, name)


@dataclass(frozen=True)
class Resumed:
    """A resumed migration: its summary (job_id: the run queued with it) and the publish to
    call once the caller's transaction committed (else the relay sends the run)."""

    summary: dict[str, Any]
    job_id: str
    publish: Callable[[], object]


def resume_run(session: Session, name: str, *, actor: str,
               reason: str = "resumed by an operator", source: str = "api",
               params: dict[str, Any] | None = None) -> Resumed:
    """Mark a paused migration queued AND queue the run that goes on from its checkpoint,
    in the caller's transaction: both commit or neither does (review N6: committed apart, a
    failed submit left it queued with no job, refused by resume and retry alike)."""
    oplog.record(session, actor=actor, action="migration.resume", target=name, reason=reason)
    row = state(session, name, lock=True)
    if row["status"] != "paused":
        raise MigrationConflict(f"{name} is {row['status']}; only a paused migration can "
                                "be resumed")
    paused = _close_open_pauses(session, name, "operator")
    from workers import enqueue

    prepared = enqueue.submit_in(session, "migration.run", {**(params or {}), "name": name},
                                 source=source)
    job_id = str(prepared.row_params["id"])
    session.execute(
        text("UPDATE data_migrations SET status = 'queued', job_id = :j, changed_at = now(), "
             "updated_at = now(), seconds_paused = seconds_paused + :p WHERE name = :n"),
        {"n": name, "p": paused, "j": _uuid(job_id)},
    )
    log.info("migration.resumed", migration=name, actor=actor, paused_seconds=paused,
             job=job_id)
    return Resumed(summary(session, name), job_id,
                   lambda: enqueue.publish_prepared(prepared))


def resume(session: Session, name: str, *, actor: str,
           reason: str = "resumed by an operator") -> dict[str, Any]:
    """resume_run, for a caller that leaves the publish to the relay."""
    return resume_run(session, name, actor=actor, reason=reason).summary


def cancel(session: Session, name: str, *, actor: str, reason: str) -> dict[str, Any]:
    """Stop a migration for good (batches done stay done; a new run starts a new pass)."""
    oplog.record(session, actor=actor, action="migration.cancel", target=name, reason=reason)
    row = state(session, name, lock=True)
    if row["status"] not in ("queued", "running", "paused", "failed", "reversing"):
        raise MigrationConflict(f"{name} is {row['status']}; nothing to cancel")
    paused = _close_open_pauses(session, name, "operator")
    session.execute(
        text("UPDATE data_migrations SET status = 'cancelled', "
             "changed_at = clock_timestamp(), "
             "updated_at = now(), finished_at = now(), seconds_paused = seconds_paused + :p "
             "WHERE name = :n"),
        {"n": name, "p": paused},
    )
    log.info("migration.cancelled", migration=name, actor=actor, reason=reason)
    return summary(session, name)


@dataclass(frozen=True)
class RetryPlan:
    """How to run a failed migration again: retry its failed job (same id, through the
    core's operator retry), or submit a new run (`job_id` None) with `params` under `key`
    (the failed run's params: a fixed batch size stays fixed)."""

    name: str
    job_id: str | None
    key: str
    params: dict[str, Any] = field(default_factory=dict)


def _retry_key(row: RowMapping) -> str:
    """One key per failure: the pass (its number and start) and the attempt that failed, so
    a repeated sweep or a double click retries once, and a later failure gets a new key. A
    `queued` migration with no run is no attempt's failure: its key names the moment it was
    queued (that attempt's retry key may be spent already)."""
    started = row["started_at"].timestamp() if row["started_at"] is not None else 0
    queued = (f":q{row['changed_at'].timestamp():.3f}"
              if row["status"] == "queued" and row["changed_at"] is not None else "")
    return (f"migration.retry:{row['name']}:r{row['run_no']}@{started:.0f}"
            f":a{row['attempts']}{queued}")[:200]


def _run_params(session: Session, name: str, job_id: Any) -> dict[str, Any]:
    """The params of the migration's last run, for the next one (never a dry run)."""
    params: dict[str, Any] = {"name": name}
    if job_id is not None:
        stored = session.execute(text("SELECT params FROM job_runs WHERE id = :id"),
                                 {"id": uuid.UUID(str(job_id))}).scalar()
        if isinstance(stored, dict) and stored.get("batch_size"):
            params["batch_size"] = stored["batch_size"]
    return params


def retry(session: Session, name: str, *, actor: str,
          reason: str = "retried by an operator") -> RetryPlan:
    """Check the migration is failed and record who retries it; the caller executes the plan
    (the run itself resumes at the checkpoint and counts the attempt)."""
    oplog.record(session, actor=actor, action="migration.retry", target=name, reason=reason)
    row = state(session, name, lock=True)
    job = _job_row(session, row["job_id"])
    if _effective_status(row, job) != "failed":
        raise MigrationConflict(f"{name} is {row['status']}; only a failed migration can be "
                                "retried")
    key = _retry_key(row)
    params = _run_params(session, name, row["job_id"])
    if job is not None and job["status"] in ("failed", "dead"):
        return RetryPlan(name, str(job["id"]), key, params)
    return RetryPlan(name, None, key, params)


def due_for_retry(session: Session) -> list[RetryPlan]:
    """Failed migrations whose pass still has attempts left (migration.retry_failed)."""
    plans = []
    for name in registry.names():
        row = state(session, name)
        job = _job_row(session, row["job_id"])
        if _effective_status(row, job) == "failed" and row["attempts"] < row["max_attempts"]:
            plans.append(RetryPlan(
                name, None, _retry_key(row),
                _run_params(session, name, row["job_id"])))
    return plans


# -- the runner ---------------------------------------------------------------------------


def _no_progress(done: int, total: int | None = None, **extra: Any) -> None:
    return None


def _pass(*_: Any) -> None:
    return None


@dataclass
class Hooks:
    """What a run needs from its host. Defaults run it in-process (tests, benchmarks);
    the task passes the job core's fenced session, complete, progress and check_owned."""

    session: Callable[[], AbstractContextManager[Session]] = session_scope
    complete: Callable[[Session, dict[str, Any]], dict[str, Any]] = \
        field(default=lambda _s, result: result)
    progress: Callable[..., None] = _no_progress
    check_owned: Callable[[], None] = _pass
    job_id: str | None = None
    # submit(session, params, idempotency_key, countdown) -> (job id, publish): queue the
    # successor in the given transaction (successor_in) to hand the migration over to a
    # fresh job after WARDEN_MIGRATION_RUN_SECONDS; publish() sends it once that committed.
    # None: one run does it all.
    submit: Callable[[Session, dict[str, Any], str, float],
                     tuple[str, Callable[[], object]]] | None = None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic


class _Stop(Exception):
    """The run ends with `result` (already recorded by complete in a committed transaction)."""

    def __init__(self, result: dict[str, Any]) -> None:
        super().__init__(result.get("status"))
        self.result = result


def run(name: str, *, batch_size: int | None = None, dry_run: bool = False,
        hooks: Hooks | None = None) -> dict[str, Any]:
    """Run (or resume) migration `name` to its end, a pause, a cancel or a handover.

    Returns the job result; raises MigrationFailed after recording the failure.
    """
    runner = _Runner(_migration(name), hooks or Hooks(), batch_size, dry_run)
    try:
        runner.start()
        while True:
            runner.hooks.check_owned()
            runner.maybe_hand_over()
            runner.throttle()
            runner.step()
    except _Stop as stop:
        return stop.result


T = TypeVar("T")


class _Runner:
    """One run's loop state. Every transaction goes through `_txn`, so a method that ends
    the run (`self.stop`, after `complete`) or fails it (`self.fail`) lets its transaction
    commit first and raises after."""

    def __init__(self, m: Migration, hooks: Hooks, batch_size: int | None, dry: bool) -> None:
        self.settings = settings = get_settings()
        self.m, self.hooks, self.dry_run = m, hooks, dry
        self.fixed = batch_size is not None
        self.size = batch_size or settings.migration_batch_initial
        self.began = hooks.clock()
        self.mark = self.began  # start of the running time not yet added to the state
        self.tries = 0  # failed tries of the current batch in this run
        self.run_no = 0
        self.cursor: int | None = None
        self.prev_batch_id: int | None = None
        self.prev_held: float | None = None
        self.longest = 0.0
        self.totals = {"rows": 0, "changed": 0, "rejected": 0, "batches": 0}
        self.rows_total: int | None = None
        self.sample: list[dict[str, Any]] = []
        self.batch: Batch | None = None
        self.began_batch = self.began
        self.stop: dict[str, Any] | None = None
        self.fail: Exception | None = None

    def _txn(self, body: Callable[[Session], T], *, fenced: bool = True) -> T:
        """Run `body` in one transaction (the job's fenced one unless told otherwise)."""
        with (self.hooks.session() if fenced else session_scope()) as s:
            out = body(s)
        if self.stop is not None:
            raise _Stop(self.stop)
        if self.fail is not None:
            raise self.fail
        return out

    def _end(self, s: Session, result: dict[str, Any]) -> None:
        """Record the job's outcome in this transaction; the run stops after its commit."""
        self.stop = self.hooks.complete(s, result)

    # -- start -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.dry_run:
            def look(s: Session) -> None:
                self.rows_total = self.m.estimate(s)
                run_no = s.execute(text("SELECT run_no FROM data_migrations WHERE name = :n"),
                                   {"n": self.m.name}).scalar()
                self.run_no = int(run_no or 0) + 1

            self._txn(look, fenced=False)
        else:
            self._txn(self._claim)
        self.mark = self.hooks.clock()

    def _claim(self, s: Session) -> None:
        """Take the migration for this run, or end the run when it must not run."""
        name = self.m.name
        row = state(s, name, lock=True)
        job = _job_row(s, self.hooks.job_id)
        asked_at: datetime | None = job["created_at"] if job is not None else None
        status = row["status"]
        if status == "reversing":
            raise TransientError(f"{name} is being reversed; the run waits")
        # The latest decision wins: a run asked for before a pause, a cancel or the end is
        # a stale one (a duplicate, a handover that raced the operator): it does nothing.
        if status in ("paused", "cancelled", "succeeded") and asked_at is not None \
                and row["changed_at"] > asked_at:
            log.info("migration.run_skipped", migration=name, status=status)
            self._end(s, {"name": name, "status": status, "skipped": True,
                          "reason": f"{name} was {status} after this run was asked for"})
            return
        self.run_no = int(row["run_no"])
        sets = ["status = 'running'", "job_id = :job", "changed_at = now()",
                "updated_at = now()", "max_attempts = :max"]
        args: dict[str, Any] = {"n": name, "job": _uuid(self.hooks.job_id),
                                "max": self.settings.migration_max_attempts}
        if status in ("pending", "succeeded", "cancelled"):
            self.run_no += 1
            self.rows_total = self.m.estimate(s)
            sets += ["run_no = :run", "cursor = NULL", "rows_done = 0", "rows_total = :total",
                     "rows_changed = 0", "rejected = 0", "batches_done = 0", "attempts = 1",
                     "last_error = NULL", "last_error_at = NULL", "seconds_running = 0",
                     "seconds_paused = 0", "seconds_throttled = 0", "verify_remaining = NULL",
                     "longest_batch_seconds = 0", "started_at = now()", "finished_at = NULL"]
            args.update(run=self.run_no, total=self.rows_total)
        else:
            self.rows_total = row["rows_total"]
            if status == "failed":
                sets.append("attempts = attempts + 1")
            elif status == "paused":  # asked for after the pause: a resume by other means
                sets.append("seconds_paused = seconds_paused + :paused")
                args["paused"] = _close_open_pauses(s, name, "operator")
        if not self.fixed and row["batch_size"]:
            self.size = int(row["batch_size"])
        sets.append("batch_size = :size")
        args["size"] = self.size
        s.execute(text(f"UPDATE data_migrations SET {', '.join(sets)} WHERE name = :n"), args)
        log.info("migration.run_started", migration=name, run_no=self.run_no,
                 resumed_from=row["cursor"], previous=status)

    # -- one batch -------------------------------------------------------------------------

    def step(self) -> None:
        """One batch, with the error policy around it."""
        try:
            self._txn(self._batch)
        except sqlalchemy.exc.DBAPIError as exc:
            self._batch_error(exc)
            return
        self.tries = 0
        held = self.hooks.clock() - self.began_batch  # through COMMIT: locks released
        self.prev_held = held
        self.longest = max(self.longest, held)
        if not self.fixed:
            self.size = _next_size(self.size, held, self.settings)
        self._report()

    def _batch(self, s: Session) -> None:
        self.batch = None
        row = None
        if not self.dry_run:
            row = self._owned_state(s)
            if row is None:
                return
            self.cursor = row["cursor"]
        s.execute(text("SELECT set_config('lock_timeout', :l, true), "
                       "set_config('statement_timeout', :t, true)"),
                  {"l": f"{int(self.settings.migration_lock_timeout * 1000)}ms",
                   "t": f"{int(self.settings.migration_statement_timeout * 1000)}ms"})
        batch = self.m.select_next(s, self.cursor, self.size)
        if batch is None:
            self._finish(s)
            return
        self.batch = batch
        ctx = Context(self.m.name, self.run_no, self.hooks.job_id)
        self.began_batch = self.hooks.clock()
        if self.dry_run:
            savepoint = s.begin_nested()
            ensure_state(s, self.m.name)  # the rejects' foreign key, rolled back with them
            outcome = self.m.transform(s, ctx, batch)
            if outcome.rejected and len(self.sample) < REJECT_SAMPLE:
                self.sample += _range_rejects(s, self.m.name, batch,
                                              REJECT_SAMPLE - len(self.sample))
            savepoint.rollback()
        else:
            outcome = self.m.transform(s, ctx, batch)
            self._checkpoint(s, batch, outcome.changed, outcome.rejected,
                             self.hooks.clock() - self.began_batch)
        self.cursor = batch.upper
        self.totals["rows"] += batch.size
        self.totals["changed"] += outcome.changed
        self.totals["rejected"] += outcome.rejected
        self.totals["batches"] += 1

    def _owned_state(self, s: Session) -> RowMapping | None:
        """The locked state if this run still owns the migration; else the run ends here
        (its result says why) and None is returned."""
        row = state(s, self.m.name, lock=True)
        if row["status"] == "running" and str(row["job_id"]) == str(self.hooks.job_id):
            return row
        self._piggyback(s)
        if row["status"] in ("running", "queued"):
            result = {"name": self.m.name, "status": "superseded",
                      "by_job": str(row["job_id"]) if row["job_id"] else None}
        else:
            result = {"name": self.m.name, "status": str(row["status"]),
                      "cursor": row["cursor"], "rows_done": row["rows_done"]}
        log.info("migration.run_stopped", migration=self.m.name, status=result["status"])
        self._end(s, result)
        return None

    def _checkpoint(self, s: Session, batch: Batch, changed: int, rejected: int,
                    seconds: float) -> None:
        """The batch's record and the new cursor, in the batch's own transaction."""
        self._piggyback(s)
        now = self.hooks.clock()
        active, self.mark = now - self.mark, now
        self.prev_batch_id = self._record_batch(s, batch, "succeeded", None, changed,
                                                rejected, seconds)
        s.execute(text(
            "UPDATE data_migrations SET cursor = :upper, rows_done = rows_done + :n, "
            "rows_changed = rows_changed + :c, rejected = rejected + :r, "
            "batches_done = batches_done + 1, batch_size = :size, "
            "seconds_running = seconds_running + :active, updated_at = now() "
            "WHERE name = :name"
        ), {"upper": batch.upper, "n": batch.size, "c": changed, "r": rejected,
            "size": self.size, "active": active, "name": self.m.name})

    def _piggyback(self, s: Session) -> None:
        """Store the previous batch's full lock time (known only after its COMMIT)."""
        if self.prev_batch_id is None or self.prev_held is None:
            return
        s.execute(text("UPDATE data_migration_batches SET seconds = :h WHERE id = :id"),
                  {"h": self.prev_held, "id": self.prev_batch_id})
        s.execute(text(
            "UPDATE data_migrations SET longest_batch_seconds = "
            "greatest(longest_batch_seconds, :h) WHERE name = :n"
        ), {"h": self.prev_held, "n": self.m.name})
        self.prev_batch_id = None

    def _record_batch(self, s: Session, batch: Batch | None, status: str, error: str | None,
                      changed: int = 0, rejected: int = 0,
                      seconds: float | None = None) -> int:
        """Insert the batch's row, or update the row of an earlier failed try of it."""
        lower = batch.lower if batch is not None else self.cursor
        existing = s.execute(text(
            "SELECT id FROM data_migration_batches WHERE migration = :n AND run_no = :r "
            "AND lower_id IS NOT DISTINCT FROM CAST(:lo AS bigint) "
            "AND status IN ('retrying', 'failed') ORDER BY id DESC LIMIT 1 FOR UPDATE"
        ), {"n": self.m.name, "r": self.run_no, "lo": lower}).scalar()
        args = {"n": self.m.name, "r": self.run_no, "lo": lower,
                "up": batch.upper if batch is not None else None,
                "size": batch.size if batch is not None else self.size, "c": changed,
                "rej": rejected, "st": status, "sec": seconds, "err": error,
                "job": _uuid(self.hooks.job_id)}
        if existing is not None:
            s.execute(text(
                "UPDATE data_migration_batches SET upper_id = :up, size = :size, "
                "rows_changed = :c, rejected = :rej, status = :st, attempts = attempts + 1, "
                "seconds = :sec, error = coalesce(:err, error), job_id = :job WHERE id = :id"
            ), {**args, "id": existing})
            return int(existing)
        return int(s.execute(text(
            "INSERT INTO data_migration_batches (migration, run_no, batch_no, lower_id, "
            "upper_id, size, rows_changed, rejected, status, seconds, error, job_id) "
            "SELECT name, :r, batches_done + 1, CAST(:lo AS bigint), CAST(:up AS bigint), :size, "
            ":c, :rej, CAST(:st AS varchar), CAST(:sec AS float8), CAST(:err AS text), "
            "CAST(:job AS uuid) FROM data_migrations WHERE name = :n RETURNING id"
        ), args).scalar_one())

    def _finish(self, s: Session) -> None:
        """No batch left: verify, then succeeded (zero rows left) or failed."""
        s.execute(text("SELECT set_config('statement_timeout', '0', true)"))
        remaining = self.m.verify(s)
        if self.dry_run:
            self._end(s, self._result("dry_run", remaining))
            return
        self._piggyback(s)
        now = self.hooks.clock()
        active, self.mark = now - self.mark, now
        if remaining == 0:
            done = s.execute(text(
                "UPDATE data_migrations SET status = 'succeeded', verify_remaining = 0, "
                "finished_at = now(), changed_at = now(), updated_at = now(), "
                "seconds_running = seconds_running + :a WHERE name = :n "
                f"RETURNING {STATE_COLUMNS}"
            ), {"a": active, "n": self.m.name}).mappings().one()
            log.info("migration.succeeded", migration=self.m.name, rows=done["rows_done"])
            self._end(s, self._final(done))
            return
        # Rows are left behind the cursor (written there during the pass): the next try
        # starts the scan again; every transform is idempotent, so done rows stay done.
        message = f"verify: {remaining} rows still to migrate after the last batch"
        s.execute(text(
            "UPDATE data_migrations SET status = 'failed', verify_remaining = :v, "
            "cursor = NULL, rows_done = 0, last_error = :e, last_error_at = now(), "
            "changed_at = now(), updated_at = now(), seconds_running = seconds_running + :a "
            "WHERE name = :n"
        ), {"v": remaining, "e": message, "a": active, "n": self.m.name})
        log.error("migration.verify_failed", migration=self.m.name, remaining=remaining)
        self.fail = MigrationFailed(f"{self.m.name}: {message}", remaining=remaining)

    # -- errors ------------------------------------------------------------------------------

    def _batch_error(self, exc: sqlalchemy.exc.DBAPIError) -> None:
        """Split on a timeout; retry a transient error with backoff; else fail."""
        sqlstate = getattr(exc.orig, "sqlstate", None)
        message = describe(exc)
        batch = self.batch
        asked = batch.size if batch is not None else self.size
        if sqlstate in TIMEOUT_STATES and asked > 1:
            half = max(1, asked // 2)
            log.warning("migration.batch_split", migration=self.m.name, size=asked,
                        half=half, error=message)
            if not self.dry_run:
                def split(s: Session) -> None:
                    if self._owned_state(s) is None:
                        return
                    self._record_batch(s, batch, "split", message)
                    s.execute(text("UPDATE data_migrations SET batch_size = :h, "
                                   "updated_at = now() WHERE name = :n"),
                              {"h": half, "n": self.m.name})

                self._txn(split)
            self.size = half
            return
        self.tries += 1
        transient = isinstance(exc, sqlalchemy.exc.OperationalError | sqlalchemy.exc.InterfaceError)
        if transient and self.tries < self.settings.migration_batch_attempts:
            delay = backoff(self.tries)
            log.warning("migration.batch_retry", migration=self.m.name, attempt=self.tries,
                        delay=round(delay, 2), error=message)
            if not self.dry_run:
                def retrying(s: Session) -> None:
                    if self._owned_state(s) is not None:
                        self._record_batch(s, batch, "retrying", message)

                self._txn(retrying)
            self.hooks.sleep(delay)
            self.mark += delay  # waiting is not running
            return
        where = (f"batch ({batch.lower}, {batch.upper}]" if batch is not None
                 else f"after {self.cursor}")
        failure = f"{where}, try {self.tries}: {message}"
        log.error("migration.failed", migration=self.m.name, error=failure)
        self.fail = MigrationFailed(f"{self.m.name} failed at {failure}")
        if self.dry_run:
            raise self.fail from exc

        def failed(s: Session) -> None:
            if self._owned_state(s) is None:
                return
            self._record_batch(s, batch, "failed", message)
            s.execute(text(
                "UPDATE data_migrations SET status = 'failed', last_error = :e, "
                "last_error_at = now(), changed_at = now(), updated_at = now() "
                "WHERE name = :n"), {"e": failure[:4000], "n": self.m.name})

        self._txn(failed)

    # -- throttle and handover ----------------------------------------------------------------

    def _health(self) -> str | None:
        def check(s: Session) -> str | None:
            for health in self.m.health_checks:
                reason = health(s, self.m.table)
                if reason:
                    return f"{health.name}: {reason}"
            return None

        return self._txn(check, fenced=False)

    def throttle(self) -> None:
        """Wait while a health check says so; the wait is recorded and not running time."""
        reason = self._health()
        if reason is None:
            return
        log.warning("migration.throttled", migration=self.m.name, reason=reason)
        started = self.hooks.clock()
        pause_id: int | None = None
        if not self.dry_run:
            def open_pause(s: Session) -> int | None:
                if self._owned_state(s) is None:
                    return None
                return int(s.execute(text(
                    "INSERT INTO data_migration_pauses (migration, kind, reason, job_id) "
                    "VALUES (:n, 'throttle', :r, :j) RETURNING id"
                ), {"n": self.m.name, "r": reason, "j": _uuid(self.hooks.job_id)}).scalar_one())

            pause_id = self._txn(open_pause)
        self.hooks.progress(self.totals["rows"], self.rows_total, status="throttled",
                            reason=reason)
        wait = THROTTLE_FIRST_WAIT
        try:
            while reason is not None:
                self.hooks.check_owned()
                self.hooks.sleep(wait)
                wait = min(wait * 2, self.settings.migration_throttle_max_wait)
                if not self.dry_run:
                    row = self._txn(lambda s: state(s, self.m.name), fenced=False)
                    if row["status"] != "running" or str(row["job_id"]) != str(
                            self.hooks.job_id):
                        break  # the next batch transaction stops the run and says why
                if self._slice_over():
                    break
                reason = self._health()
        finally:
            waited = self.hooks.clock() - started
            self.mark += waited
            if pause_id is not None:
                def close_pause(s: Session) -> None:
                    s.execute(text(
                        "UPDATE data_migration_pauses SET ended_at = now(), seconds = :w "
                        "WHERE id = :id"), {"w": waited, "id": pause_id})
                    s.execute(text(
                        "UPDATE data_migrations SET seconds_throttled = seconds_throttled + :w, "
                        "updated_at = now() WHERE name = :n"), {"w": waited, "n": self.m.name})

                self._txn(close_pause)
        log.info("migration.throttle_ended", migration=self.m.name,
                 seconds=round(waited, 2), still=reason)
        if reason is not None and self._slice_over():
            self._hand_over(float(self.settings.migration_throttle_max_wait))

    def _slice_over(self) -> bool:
        return (self.hooks.submit is not None and not self.dry_run
                and self.hooks.clock() - self.began > self.settings.migration_run_seconds)

    def maybe_hand_over(self) -> None:
        if self._slice_over():
            self._hand_over(0.0)

    def _hand_over(self, countdown: float) -> None:
        """The checkpoint is committed: enqueue the next run and end this job.

        Why one transaction under the state row's lock: an operator's pause or cancel either
        commits first (this run no longer owns the migration: no successor at all) or after
        (it stops the successor, asked for before it). A successor queued outside that lock
        could be created just after a cancel, and start a new pass of a cancelled migration.
        The key names this job and its checkpoint: a redelivery of this job that hands over
        at the same point finds the same successor, and no other run can collide.
        """
        submit = self.hooks.submit
        assert submit is not None
        publish: Callable[[], object] | None = None

        def hand(s: Session) -> None:
            nonlocal publish
            row = self._owned_state(s)
            if row is None:
                return
            params: dict[str, Any] = {"name": self.m.name}
            if self.fixed:
                params["batch_size"] = self.size
            key = (f"migration.run:{self.m.name}:after:{self.hooks.job_id}"
                   f":b{row['batches_done']}")
            successor, publish = submit(s, params, key, countdown)
            s.execute(text(
                "UPDATE data_migrations SET status = 'queued', job_id = :j, "
                "changed_at = clock_timestamp(), updated_at = now() WHERE name = :n"
            ), {"j": _uuid(successor), "n": self.m.name})
            log.info("migration.handed_over", migration=self.m.name, successor=successor)
            self._end(s, {"name": self.m.name, "status": "handed_over",
                          "successor": successor, "rows": self.totals["rows"],
                          "batches": self.totals["batches"]})

        try:
            self._txn(hand)
        except _Stop:
            if publish is not None:  # committed: send it (if this fails, the relay does)
                publish()
            raise

    # -- reporting -----------------------------------------------------------------------------

    def _report(self) -> None:
        running = self.hooks.clock() - self.began
        rate = self.totals["rows"] / running if running > 0 else None
        eta = None
        if rate and self.rows_total is not None:
            eta = max(0.0, (self.rows_total - self.totals["rows"]) / rate)
        self.hooks.progress(self.totals["rows"], self.rows_total, status="running",
                            batch_size=self.size, changed=self.totals["changed"],
                            rejected=self.totals["rejected"],
                            rows_per_second=round(rate, 1) if rate else None,
                            eta_seconds=round(eta, 1) if eta is not None else None)

    def _result(self, status: str, remaining: int) -> dict[str, Any]:
        return {"name": self.m.name, "status": status, "dry_run": self.dry_run,
                **self.totals, "verify_remaining": remaining,
                "longest_batch_seconds": round(self.longest, 4),
                **({"rejects": self.sample} if self.dry_run else {})}

    def _final(self, row: RowMapping) -> dict[str, Any]:
        return {"name": self.m.name, "status": "succeeded", "run_no": row["run_no"],
                "rows": row["rows_done"], "changed": row["rows_changed"],
                "rejected": row["rejected"], "batches": row["batches_done"],
                "attempts": row["attempts"], "verify_remaining": 0,
                "seconds_running": round(float(row["seconds_running"]), 3),
                "seconds_paused": round(float(row["seconds_paused"]), 3),
                "seconds_throttled": round(float(row["seconds_throttled"]), 3),
                "longest_batch_seconds": round(max(float(row["longest_batch_seconds"]),
                                                   self.longest), 4)}


def _next_size(size: int, held: float, settings: Any) -> int:
    """The next batch size: aim at TARGET_SHARE of the budget, in bounded steps."""
    target = settings.migration_batch_seconds * TARGET_SHARE
    factor = GROW_AT_MOST if held <= 0 else min(GROW_AT_MOST, max(SHRINK_AT_MOST,
                                                                   target / held))
    return max(settings.migration_batch_min, min(settings.migration_batch_max,
                                                 int(size * factor)))


def _range_rejects(s: Session, name: str, batch: Batch, limit: int) -> list[dict[str, Any]]:
    rows = s.execute(text(
        "SELECT row_id, position, reason FROM data_migration_rejects WHERE migration = :n "
        "AND row_id > :lo AND row_id <= :up ORDER BY row_id, position LIMIT :l"
    ), {"n": name, "lo": batch.lower if batch.lower is not None else -1, "up": batch.upper,
        "l": limit}).mappings().all()
    return [dict(r) for r in rows]


def _uuid(value: Any) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(str(value))


def reverse(name: str, *, actor: str, reason: str, hooks: Hooks | None = None) -> dict[str, Any]:
    """Undo what the migration made, batch by batch (one transaction each), and set it back
    to `pending`. Refused while it is queued or running; each batch's reverse deletes only
    rows the migration made, so a reverse cut short is simply run again."""
    m = _migration(name)
    if m.reverse is None:
        raise MigrationConflict(f"{name} has no reverse")
    undo = m.reverse
    hooks = hooks or Hooks()
    with hooks.session() as s:
        oplog.record(s, actor=actor, action="migration.reverse", target=name, reason=reason)
        row = state(s, name, lock=True)
        job = _job_row(s, row["job_id"])
        if row["status"] in ("queued", "running") and _effective_status(row, job) != "failed":
            raise MigrationConflict(f"{name} is {row['status']}; pause or cancel it first")
        s.execute(text("UPDATE data_migrations SET status = 'reversing', changed_at = now(), "
                       "updated_at = now(), job_id = :j WHERE name = :n"),
                  {"n": name, "j": _uuid(hooks.job_id)})
    cursor: int | None = None
    deleted = batches_undone = 0
    size = get_settings().migration_batch_initial
    while True:
        hooks.check_owned()
        with hooks.session() as s:
            batch = m.select_next(s, cursor, size)
            if batch is None:
                s.execute(text(
                    "UPDATE data_migrations SET status = 'pending', cursor = NULL, "
                    "rows_done = 0, rows_changed = 0, rejected = 0, batches_done = 0, "
                    "verify_remaining = NULL, finished_at = now(), changed_at = now(), "
                    "updated_at = now() WHERE name = :n"), {"n": name})
                result = {"name": name, "status": "reversed", "deleted": deleted,
                          "batches": batches_undone}
                return hooks.complete(s, result)
            deleted += undo(s, batch)
        cursor = batch.upper
        batches_undone += 1
        hooks.progress(batches_undone, None, deleted=deleted)


def successor_in(session: Session, params: dict[str, Any], key: str,
                 countdown: float) -> tuple[str, Callable[[], object]]:
    """Queue the next `migration.run` in the caller's (the handover's) transaction: its id,
    and the publish to call once that transaction committed (else the relay sends it).
    A key already used (a redelivered run handing over at the same checkpoint) returns
    that job and publishes nothing."""
    from workers import enqueue

    prepared = enqueue.prepare("migration.run", params, idempotency_key=key,
                               countdown=countdown or None, source="migration")
    conn = session.connection()
    if conn.exec_driver_sql(enqueue.INSERT_JOB, prepared.row_params).first() is None:
        found = conn.exec_driver_sql(enqueue.SELECT_BY_KEY, {"k": key}).mappings().one()
        return str(found["id"]), lambda: None
    return str(prepared.row_params["id"]), lambda: enqueue.publish_prepared(prepared)
