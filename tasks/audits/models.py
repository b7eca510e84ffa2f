"""Audit tables: every run, its findings, and the before/after of every row a fix changed.

Why store findings per run instead of overwriting a result table (as dbt tests or Soda do):
a fix must be reviewable and undoable, and yesterday's findings must still be readable
after tonight's run.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from workers.db import Base

AUDIT_MODES = ("check", "fix")
LEVELS = ("finding", "report")
# What a fix run did with each finding: fixed; resolved_meanwhile (the locked row no
# longer broke the rule: left alone); blocked (the row also breaks a rule of a check not
# selected, which its constraint would refuse: nothing changed); gone (row deleted since
# the scan); unfixable (no automatic fix, e.g. a scene's flags).
# award_submitted, award_pending: a scene awaiting XP whose award a fix queued, or found
# already queued (migration 0010).
OUTCOMES = ("fixed", "resolved_meanwhile", "blocked", "gone", "unfixable", "award_submitted",
            "award_pending")
UNDO_OUTCOMES = ("reverted", "changed_since")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class AuditRun(Base):
    """One audit: when, what was asked, the totals per check, and an undo if one ran."""

    __tablename__ = "audit_runs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    mode: Mapped[str] = mapped_column(String(8), nullable=False)
    checks: Mapped[list[str]] = mapped_column(ARRAY(String(40)), nullable=False)
    rules_version: Mapped[str] = mapped_column(String(32), nullable=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    finished_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now())
    findings: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    reports: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    fixed: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    remaining: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    changed_rows: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    totals: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    undone_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    undone_by: Mapped[str | None] = mapped_column(String(100))
    undo: Mapped[dict[str, Any] | None] = mapped_column(JSONB)

    __table_args__ = (
        CheckConstraint(_in("mode", AUDIT_MODES), name="mode"),
        Index("uq_audit_runs_job_id", "job_id", unique=True,
              postgresql_where="job_id IS NOT NULL"),
        Index("ix_audit_runs_started", "started_at"),
    )


class AuditFinding(Base):
    """One broken rule of one row, as the run found it (value) and what the rule wants."""

    __tablename__ = "audit_findings"

    # No foreign key (see migration 0003): its per-row check doubled the cost of storing
    # ~450K findings. They are written only in their run's transaction; whatever deletes a
    # run (no retention job does yet) deletes its findings with it.
    run_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # The primary key (run_id, check_name, id) is the one index: findings page by (check,
    # id), of every check or one (a second index by id cost a third more on storing them).
    check_name: Mapped[str] = mapped_column(String(40), primary_key=True)
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    rule: Mapped[str] = mapped_column(String(64), nullable=False)
    level: Mapped[str] = mapped_column(String(8), nullable=False)
    entity: Mapped[str] = mapped_column(String(32), nullable=False)
    entity_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    field: Mapped[str] = mapped_column(String(64), nullable=False)
    value: Mapped[Any] = mapped_column(JSONB)
    expected: Mapped[str] = mapped_column(Text, nullable=False)
    fix: Mapped[Any] = mapped_column(JSONB)  # the value the fix sets (JSON null: unknown)
    fixable: Mapped[bool] = mapped_column(Boolean, nullable=False)
    outcome: Mapped[str | None] = mapped_column(String(24))

    __table_args__ = (
        CheckConstraint(_in("level", LEVELS), name="level"),
        CheckConstraint(f"outcome IS NULL OR {_in('outcome', OUTCOMES)}", name="outcome"),
    )


class AuditChange(Base):
    """A row a fix changed (or deleted): the changed columns before and after."""

    __tablename__ = "audit_changes"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    run_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("audit_runs.id", ondelete="CASCADE"), nullable=False)
    entity: Mapped[str] = mapped_column(String(32), nullable=False)
    entity_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    action: Mapped[str] = mapped_column(String(8), nullable=False)
    before: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # A status set by the audit, not by an allowed transition (DOMAIN.md check 2).
    forced_status: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    # characters.updated_at right after the fix: the undo reverts only rows still at it.
    row_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    undo_outcome: Mapped[str | None] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("action IN ('update', 'delete')", name="action"),
        CheckConstraint(f"undo_outcome IS NULL OR {_in('undo_outcome', UNDO_OUTCOMES)}",
                        name="undo_outcome"),
        Index("ix_audit_changes_run_entity", "run_id", "entity", "entity_id"),
    )
