"""Job-table retention: finished jobs go after their retention period, in batches.

Why batches: one DELETE of millions of rows would hold their locks and bloat the table in
one go; a batch of a few thousand commits in tens of milliseconds. Statistics (job_stats)
and each schedule's last success are kept apart and survive the prune; the operator log is
never pruned. A parent is deleted with its children (ON DELETE CASCADE), so a parent waits
while any of its children is younger than that child's own retention, and a child is never
deleted while its parent has not ended (the parent reads the children's results).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

KEPT_SHORT = ("succeeded", "cancelled")
KEPT_LONG = ("failed", "dead")

_ELIGIBLE = """
FROM job_runs j
WHERE j.status = :status AND j.created_at < :cutoff AND j.finished_at < :cutoff
  AND (j.parent_id IS NULL OR NOT EXISTS (
        SELECT 1 FROM job_runs p WHERE p.id = j.parent_id
        AND p.status NOT IN ('succeeded', 'failed', 'dead', 'cancelled')))
  AND (j.children_total = 0 OR NOT EXISTS (
        SELECT 1 FROM job_runs c WHERE c.parent_id = j.id AND (
            c.finished_at IS NULL
            OR (c.status IN ('failed', 'dead') AND c.finished_at >= :long_cutoff)
            OR c.finished_at >= :cutoff)))
"""
_DELETE = text(
    "DELETE FROM job_runs WHERE id IN (SELECT j.id " + _ELIGIBLE +
    " ORDER BY j.created_at LIMIT :n FOR UPDATE SKIP LOCKED)"
)
_COUNT = text("SELECT count(*) " + _ELIGIBLE)


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


def count_prunable(session: Session, status: str, cutoffs: Cutoffs) -> int:
    """How many jobs of `status` the prune would delete now."""
    return int(session.execute(_COUNT, {"status": status, "cutoff": cutoffs.of(status),
                                        "long_cutoff": cutoffs.long}).scalar_one())


def prune_batch(session: Session, status: str, cutoffs: Cutoffs, limit: int) -> int:
    """Delete up to `limit` prunable jobs of `status`, oldest first; returns how many."""
    result = session.execute(_DELETE, {"status": status, "cutoff": cutoffs.of(status),
                                       "long_cutoff": cutoffs.long, "n": limit})
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
