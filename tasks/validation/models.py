"""Validation tables: sweeps (what ran, its counts, the watermark it sets) and issues.

Why issues with a lifecycle instead of a per-run result: an operator needs to see what is
new (first_seen), what persists (last_seen) and what was fixed (resolved_at), not only how
many issues this sweep counted.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
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

from domain import rules
from domain.models import XpLedger
from workers.db import Base

SWEEP_MODES = ("full", "incremental")
SWEEP_STATUSES = ("running", "succeeded", "failed")
PLANS = ("inline", "fanout")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class ValidationSweep(Base):
    """One validation.characters job: its plan, counts, and the watermark it leaves."""

    __tablename__ = "validation_sweeps"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    mode: Mapped[str] = mapped_column(String(16), nullable=False)
    character_ids: Mapped[list[int] | None] = mapped_column(ARRAY(BigInteger))
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="running")
    plan: Mapped[str] = mapped_column(String(8), nullable=False)
    rules_version: Mapped[str] = mapped_column(String(32), nullable=False)
    # The sweep's start (transaction time): the next incremental sweep reads characters
    # updated since then, minus WARDEN_VALIDATION_WATERMARK_OVERLAP.
    scan_from: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    chunks: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    totals: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint(_in("mode", SWEEP_MODES), name="mode"),
        CheckConstraint(_in("status", SWEEP_STATUSES), name="status"),
        CheckConstraint(_in("plan", PLANS), name="plan"),
        Index("uq_validation_sweeps_job_id", "job_id", unique=True,
              postgresql_where="job_id IS NOT NULL"),
        Index("ix_validation_sweeps_watermark", "rules_version", "scan_from",
              postgresql_where="status = 'succeeded' AND character_ids IS NULL"),
    )


class ValidationIssue(Base):
    """One broken rule of one character, from the first sweep that saw it until one that
    found it fixed. A rule broken again later opens a new row (the old one is history)."""

    __tablename__ = "validation_issues"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    character_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("characters.id", ondelete="CASCADE"), nullable=False)
    rule: Mapped[str] = mapped_column(String(64), nullable=False)
    subject: Mapped[str] = mapped_column(String(100), nullable=False)
    severity: Mapped[str] = mapped_column(String(8), nullable=False)
    message: Mapped[str] = mapped_column(Text, nullable=False)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    first_sweep_id: Mapped[int | None] = mapped_column(BigInteger)
    last_sweep_id: Mapped[int | None] = mapped_column(BigInteger)
    resolved_sweep_id: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint(_in("severity", rules.SEVERITIES), name="severity"),
        Index("uq_validation_issues_open", "character_id", "rule", "subject", unique=True,
              postgresql_where="resolved_at IS NULL"),
        Index("ix_validation_issues_character", "character_id", "id"),
    )


# The ledger check of every chunk reads sum(delta) per character over an id range: with
# delta in the index, an index-only range scan instead of nearly every heap page of
# xp_ledger per chunk (its rows lie in insertion order). Migration 0003 creates it.
Index("ix_xp_ledger_character_delta", XpLedger.__table__.c.character_id,
      postgresql_include=["delta"])
