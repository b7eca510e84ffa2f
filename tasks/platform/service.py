"""Job-table retention: finished jobs go after their retention period, in batches.

Why batches: one DELETE of millions of rows would hold their locks and bloat the table in
one go; a batch of a few thousand commits in tens of milliseconds. Statistics (job_stats)
and each schedule's last success are kept apart and survive the prune; the operator log is
never pruned.

A fan-out goes as a whole: the parent is deleted with its children (ON DELETE CASCADE) once
it and every child are past their own retention, and a child is never deleted on its own.
Why: while any member of the family can still be retried (a failed or dead parent or
child, kept 90 days), the parent may run again, and a parent that runs again reads all its
children (`fan_out` returns them); a child pruned after 30 days would be missing from that
read, and the parent would add up part of its work as if it were all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

KEPT_SHORT = ("succeeded", "cancelled")
KEPT_LONG = ("failed", "dead")

# Jobs that are not children (children go with their parent), past their retention, whose
# children are all past their own.
_ELIGIBLE = """
FROM job_runs j
WHERE j.status = :status AND j.created_at < :cutoff AND j.finished_at < :cutoff
  AND j.parent_id IS NULL
  AND (j.children_total = 0 OR NOT EXISTS (
        SELECT 1 FROM job_runs c WHERE c.parent_id = j.id AND (
            c.finished_at IS NULL
            OR c.finished_at >= CASE WHEN c.status IN ('failed', 'dead') THEN :long_cutoff
                                     ELSE :short_cutoff END)))
"""
# One batch: the oldest eligible jobs, as many as keep the batch (a parent counts with its
# children) near :n rows; `candidates` < :n says nothing eligible is left.
_DELETE = text(
    "WITH cand AS (SELECT j.id, j.created_at, j.children_total " + _ELIGIBLE +
    "  ORDER BY j.created_at LIMIT :n FOR UPDATE OF j SKIP LOCKED), "
    "pick AS (SELECT id FROM (SELECT id, sum(1 + children_total) OVER (ORDER BY created_at, id)"
    "  - (1 + children_total) AS before FROM cand) x WHERE before < :n), "
    "gone AS (DELETE FROM job_runs WHERE id IN (SELECT id FROM pick) RETURNING children_total) "
    "SELECT (SELECT count(*) FROM cand) AS candidates, "
    "COALESCE(sum(1 + children_total), 0) AS deleted FROM gone"
)
_COUNT = text("SELECT COALESCE(sum(1 + j.children_total), 0) " + _ELIGIBLE)


@dataclass(frozen=True)
class Cutoffs:
    """Jobs that finished before `short` (succeeded, cancelled) or `long` (failed, dead) go."""

    short: datetime
    long: datetime

    @classmethod
    def at(cls, now: datetime, days: int, failed_days: int) -> Cutoffs:
        return cls(now - timedelta(days=days), now - timedelta(days=max(days, failed_days)))

    def of(self, status: str) -> datetime:
        return self.long if status in KEPT_LONG else self.short


@dataclass
class PruneResult:
    dry_run: bool
    cutoffs: Cutoffs
    deleted: dict[str, int] = field(default_factory=dict)
    batches: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "batches": self.batches,
                "deleted" if not self.dry_run else "would_delete": self.deleted,
                "total": sum(self.deleted.values()),
                "cutoff": self.cutoffs.short.isoformat(),
                "failed_cutoff": self.cutoffs.long.isoformat()}


def database_now(session: Session) -> datetime:
    """The database's clock: cutoffs compare with timestamps it wrote."""
    now: datetime = session.execute(text("SELECT now()")).scalar_one()
    return now


def _args(status: str, cutoffs: Cutoffs) -> dict[str, Any]:
    return {"status": status, "cutoff": cutoffs.of(status), "short_cutoff": cutoffs.short,
            "long_cutoff": cutoffs.long}


def count_prunable(session: Session, status: str, cutoffs: Cutoffs) -> int:
    """How many jobs the prune would delete now with those of `status` (their children
    included)."""
    return int(session.execute(_COUNT, _args(status, cutoffs)).scalar_one())


def prune_batch(session: Session, status: str, cutoffs: Cutoffs, limit: int) -> tuple[int, bool]:
    """Delete about `limit` prunable jobs of `status` (with their children), oldest first;
    returns how many rows went and whether more may be left."""
    row = session.execute(_DELETE, {**_args(status, cutoffs), "n": limit}).one()
    return int(row.deleted), int(row.candidates) >= limit
