"""Operator actions on jobs: retry and cancel, one by id or many by filter, each with a
reason, each recorded in the operator log in the same transaction as the change.

Why in one transaction: the log never claims a retry that rolled back, nor misses one that
happened. A bulk retry leaves publishing to the relay (the rows are unpublished), so
thousands of jobs go out in batches without holding the request.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.engine import RowMapping

from workers import jobstore, oplog
from workers.db import session_scope

Action = Literal["retry", "cancel"]
# What each action may touch; a job in any other state is left alone (409 for one job).
ALLOWED: dict[str, tuple[str, ...]] = {"retry": ("failed", "dead"),
                                       "cancel": ("queued", "retrying")}
BULK_LIMIT = 100_000  # one transaction; beyond that, narrow the filter (time range, type)

_RETRY_SET = jobstore.RETRY_SET  # (its comment says why each column)
_CANCEL_SET = ("status='cancelled', finished_at=now(), error_code='cancelled', "
               "error_message=:why")


class FilterError(ValueError):
    """A bulk filter that cannot match what the action touches."""


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a bulk action means. Status must be one the action touches (or None: all
    of them); the time range is on created_at, [after, before)."""

    status: str | None = None
    type: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    def where(self, action: Action) -> tuple[str, dict[str, Any]]:
        allowed = ALLOWED[action]
        if self.status is not None and self.status not in allowed:
            raise FilterError(f"{action} applies to {', '.join(allowed)} jobs, not {self.status}")
        clauses = ["status = ANY(:statuses)"]
        args: dict[str, Any] = {"statuses": [self.status] if self.status else list(allowed)}
        if self.type:
            clauses.append("type = :type")
            args["type"] = self.type
        if self.created_after:
            clauses.append("created_at >= :after")
            args["after"] = self.created_after
        if self.created_before:
            clauses.append("created_at < :before")
            args["before"] = self.created_before
        return " AND ".join(clauses), args


def _one(action: Action, job_id: uuid.UUID | str, actor: str, reason: str) -> RowMapping:
    jid = uuid.UUID(str(job_id))
    sets = _RETRY_SET if action == "retry" else _CANCEL_SET
    with session_scope() as s:
        row = s.execute(
            text(f"UPDATE job_runs SET {sets} WHERE id=:id AND status = ANY(:allowed) "
                 f"RETURNING {jobstore.JOB_COLUMNS}"),
            {"id": jid, "allowed": list(ALLOWED[action]),
             "why": f"cancelled by {actor}: {reason}"[:4000]},
        ).mappings().first()
        if row is None:
            current = s.execute(text("SELECT status FROM job_runs WHERE id=:id"),
                                {"id": jid}).first()
            if current is None:
                raise jobstore.JobNotFound(f"no job {jid}")
            raise jobstore.JobStateConflict(
                f"job is {current.status}; only {' or '.join(ALLOWED[action])} jobs can be "
                f"{'retried' if action == 'retry' else 'cancelled'}")
        oplog.record(s, actor=actor, action=f"job.{action}", target=str(jid), reason=reason,
                     count=1, details={"type": row["type"]})
    return row


def retry(job_id: uuid.UUID | str, *, actor: str, reason: str) -> RowMapping:
    """A failed or dead job runs again with a fresh budget; the caller publishes it (or the
    relay does: it is unpublished)."""
    return _one("retry", job_id, actor, reason)


def cancel(job_id: uuid.UUID | str, *, actor: str, reason: str) -> RowMapping:
    """A queued or retrying job is cancelled; its message, when it comes, is skipped."""
    return _one("cancel", job_id, actor, reason)


def bulk(action: Action, flt: JobFilter, *, actor: str, reason: str,
         dry_run: bool = False) -> dict[str, Any]:
    """Retry or cancel every job the filter matches; a dry run only counts them."""
    if not reason or not reason.strip():
        raise oplog.ReasonRequired("a reason is required for operator actions")
    where, args = flt.where(action)
    with session_scope() as s:
        matched = int(s.execute(text(f"SELECT count(*) FROM job_runs WHERE {where}"),
                                args).scalar_one())
        if dry_run or matched == 0:
            return {"action": action, "matched": matched, "changed": 0, "dry_run": dry_run}
        if matched > BULK_LIMIT:
            raise FilterError(f"{matched} jobs match; at most {BULK_LIMIT} per action "
                              "(narrow the filter by type or time range)")
        sets = _RETRY_SET if action == "retry" else _CANCEL_SET
        changed = len(s.execute(
            text(f"UPDATE job_runs SET {sets} WHERE {where} RETURNING 1"),
            {**args, "why": f"cancelled by {actor}: {reason}"[:4000]},
        ).all())
        oplog.record(s, actor=actor, action=f"job.bulk_{action}", target=None, reason=reason,
                     count=changed, details={k: (str(v) if v is not None else None)
                                             for k, v in asdict(flt).items()})
    return {"action": action, "matched": matched, "changed": changed, "dry_run": False}
