"""SQL on job_runs: every state change of a job is one short statement in its own transaction.

Kept apart from the Celery base class so the API, the relay and the CLI share it, and so the
hot path (claim, finish) is plain SQL with no ORM overhead: it is what the ping bench measures.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import RowMapping

from workers.db import autocommit, session_scope

JOB_COLUMNS = (
    "id, type, params, idempotency_key, status, attempts, max_attempts, source, created_at, "
    "updated_at, not_before, expires_at, published_at, started_at, finished_at, "
    "next_attempt_at, result, error_code, error_message, worker, manual_retries"
)


@dataclass(frozen=True)
class Claim:
    """What the worker should do with a delivery: run it, or skip and why."""

    action: str  # run | done | final | dead
    attempts: int = 0
    max_attempts: int = 0
    result: dict[str, Any] | None = None
    status: str | None = None
    idempotency_key: str | None = None


def _uuid(job_id: str | uuid.UUID) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))


_EXPIRED = "expires_at < now()"
_CLAIM = text(
    "UPDATE job_runs SET "
    f"status = CASE WHEN {_EXPIRED} THEN 'cancelled' ELSE 'running' END, "
    f"attempts = attempts + CASE WHEN {_EXPIRED} THEN 0 ELSE 1 END, "
    f"started_at = CASE WHEN {_EXPIRED} THEN started_at ELSE now() END, "
    f"finished_at = CASE WHEN {_EXPIRED} THEN now() END, "
    f"error_code = CASE WHEN {_EXPIRED} THEN 'expired' ELSE error_code END, "
    f"error_message = CASE WHEN {_EXPIRED} THEN 'not started before expires_at' "
    "ELSE error_message END, "
    "worker = :w, next_attempt_at = NULL, published_at = COALESCE(published_at, now()) "
    "WHERE id = :id AND status IN ('queued', 'retrying', 'running') "
    "AND attempts < max_attempts "
    "RETURNING status, attempts, max_attempts, idempotency_key"
)


def claim(
    job_id: str,
    job_type: str,
    params: dict[str, Any],
    worker: str,
    default_max_attempts: int,
) -> Claim:
    """Mark the job running with attempts+1, if it may run. Caller holds the job's lease.

    Holding the lease means no live process is running this job, so a `running` row is an
    orphan of a dead worker and is reclaimed; past the budget it becomes `dead` instead
    (the poison-pill guard for jobs that kill their worker).
    """
    jid = _uuid(job_id)
    # The common case in one autocommit statement: a runnable job becomes running, or
    # cancelled when it was not started before expires_at.
    with autocommit() as conn:
        row = conn.execute(_CLAIM, {"id": jid, "w": worker}).first()
    if row is not None:
        if row.status == "cancelled":
            return Claim("final", row.attempts, row.max_attempts, None, "cancelled")
        return Claim("run", row.attempts, row.max_attempts,
                     idempotency_key=row.idempotency_key)
    with session_scope() as s:
        cur = s.execute(
            text("SELECT status, attempts, max_attempts, result FROM job_runs WHERE id=:id"),
            {"id": jid},
        ).first()
        if cur is None:
            # Sent by something that bypassed the enqueue path (`celery call`): adopt it.
            s.execute(
                text(
                    "INSERT INTO job_runs (id, type, params, status, attempts, max_attempts, "
                    "source, started_at, published_at, worker) VALUES (:id, :t, CAST(:p AS jsonb), "
                    "'running', 1, :m, 'celery', now(), now(), :w) ON CONFLICT (id) DO NOTHING"
                ),
                {"id": jid, "t": job_type, "p": json.dumps(params), "m": default_max_attempts,
                 "w": worker},
            )
            return Claim("run", 1, default_max_attempts)
        if cur.status == "succeeded":
            return Claim("done", cur.attempts, cur.max_attempts, cur.result, cur.status)
        if cur.status in ("failed", "dead", "cancelled"):
            return Claim("final", cur.attempts, cur.max_attempts, None, cur.status)
        # queued/retrying/running with the budget spent: the worker died on every attempt.
        s.execute(
            text(
                "UPDATE job_runs SET status='dead', finished_at=now(), error_code='worker_lost', "
                "error_message='attempt budget spent: the worker was lost on every attempt' "
                "WHERE id=:id"
            ),
            {"id": jid},
        )
        return Claim("dead", cur.attempts, cur.max_attempts, None, "dead")


def succeed(job_id: str, result: Any, worker: str) -> None:
    """Record the result; the job is final. Only the run that holds the claim may record:
    a late run whose job was reclaimed by another worker changes nothing."""
    with autocommit() as conn:
        conn.execute(
            text(
                "UPDATE job_runs SET status='succeeded', result=CAST(:r AS jsonb), "
                "finished_at=now(), error_code=NULL, error_message=NULL "
                "WHERE id=:id AND status='running' AND worker=:w"
            ),
            {"id": _uuid(job_id), "r": json.dumps(result, default=str, allow_nan=False),
             "w": worker},
        )


def fail(job_id: str, status: str, code: str, message: str,
         next_attempt_at: datetime | None = None, *, worker: str | None = None) -> None:
    """Record an error outcome: failed/dead (final) or retrying (with its next attempt time).
    Only a running job changes; with `worker`, only the run that claimed it."""
    guard = " AND status='running'" + (" AND worker=:w" if worker else "")
    with autocommit() as conn:
        conn.execute(
            text(
                "UPDATE job_runs SET status=CAST(:st AS varchar), error_code=:c, error_message=:m, "
                "next_attempt_at=:n, "
                "finished_at=CASE WHEN CAST(:st AS varchar)='retrying' THEN NULL ELSE now() END "
                "WHERE id=:id" + guard
            ),
            {"id": _uuid(job_id), "st": status, "c": code[:100], "m": message[:4000],
             "n": next_attempt_at, "w": worker},
        )


def list_jobs(
    *,
    status: str | None = None,
    job_type: str | None = None,
    limit: int = 50,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> list[RowMapping]:
    """Newest first, filtered; `before` is the (created_at, id) of the last row already seen."""
    where: list[str] = ["true"]
    args: dict[str, Any] = {"limit": limit}
    if status:
        where.append("status = :status")
        args["status"] = status
    if job_type:
        where.append("type = :type")
        args["type"] = job_type
    if before is not None:
        where.append("(created_at, id) < (:cts, :cid)")
        args["cts"], args["cid"] = before
    with session_scope() as s:
        return list(s.execute(
            text(f"SELECT {JOB_COLUMNS} FROM job_runs WHERE {' AND '.join(where)} "
                 "ORDER BY created_at DESC, id DESC LIMIT :limit"),
            args,
        ).mappings().all())


def pending_count() -> int:
    """Jobs accepted but not yet confirmed published (the outbox depth)."""
    with session_scope() as s:
        return int(s.execute(text(
            "SELECT count(*) FROM job_runs WHERE status='queued' AND published_at IS NULL"
        )).scalar_one())


def get(job_id: str | uuid.UUID) -> RowMapping | None:
    """One job row as a mapping, or None."""
    with session_scope() as s:
        return s.execute(
            text(f"SELECT {JOB_COLUMNS} FROM job_runs WHERE id=:id"), {"id": _uuid(job_id)}
        ).mappings().first()


class JobNotFound(LookupError):
    """No job with that id."""


class JobStateConflict(RuntimeError):
    """The job is in a state that does not allow the operation."""


def operator_retry(job_id: str | uuid.UUID) -> RowMapping:
    """Put a failed or dead job back in the queue with a fresh attempt budget.

    The caller publishes it (or the relay does, since published_at is reset).
    """
    jid = _uuid(job_id)
    with session_scope() as s:
        row = s.execute(
            text("UPDATE job_runs SET status='queued', attempts=0, published_at=NULL, "
                 "next_attempt_at=NULL, finished_at=NULL, expires_at=NULL, "
                 "manual_retries=manual_retries+1 WHERE id=:id AND status IN ('failed','dead') "
                 f"RETURNING {JOB_COLUMNS}"),
            {"id": jid},
        ).mappings().first()
        if row is not None:
            return row
        _raise_for_state(s, jid, "only failed or dead jobs can be retried")
    raise AssertionError("unreachable")


def operator_cancel(job_id: str | uuid.UUID) -> RowMapping:
    """Cancel a job that has not started; a running job is left to finish (409)."""
    jid = _uuid(job_id)
    with session_scope() as s:
        row = s.execute(
            text("UPDATE job_runs SET status='cancelled', finished_at=now(), "
                 "error_code='cancelled', error_message='cancelled by an operator' "
                 "WHERE id=:id AND status IN ('queued','retrying') "
                 f"RETURNING {JOB_COLUMNS}"),
            {"id": jid},
        ).mappings().first()
        if row is not None:
            return row
        _raise_for_state(s, jid, "only queued or retrying jobs can be cancelled")
    raise AssertionError("unreachable")


def _raise_for_state(s: Any, jid: uuid.UUID, rule: str) -> None:
    current = s.execute(text("SELECT status FROM job_runs WHERE id=:id"), {"id": jid}).first()
    if current is None:
        raise JobNotFound(f"no job {jid}")
    raise JobStateConflict(f"job is {current.status}; {rule}")
