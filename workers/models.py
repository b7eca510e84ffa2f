"""Platform tables: the job record (the source of truth for every job) and API tokens."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from workers.db import Base

JOB_STATUSES = (
    "queued", "running", "retrying", "waiting", "succeeded", "failed", "dead", "cancelled",
)
FINAL_STATUSES = frozenset({"succeeded", "failed", "dead", "cancelled"})
UNFINISHED_STATUSES = frozenset({"queued", "running", "retrying", "waiting"})
RETRYABLE_BY_OPERATOR = frozenset({"failed", "dead"})
SCOPES = ("read", "enqueue", "admin")


class JobRun(Base):
    """One job: what was asked, each attempt's outcome, and the result.

    `published_at` NULL on a queued job means the broker never confirmed it (the outbox
    relay publishes it). `id` is also the Celery task id.

    Ownership (ADR 0007): a claim sets `owner`, `lease_expires_at` and a new `epoch`; the
    owner heartbeats the lease; every outcome write and fenced effect is conditional on the
    epoch. `delivered_at` marks the last claim, so the relay can tell a lost message from one
    still waiting in the queue. A parent job (fan-out) waits in `waiting` until
    `children_pending` reaches 0 (a trigger counts its children's final statuses).
    """

    __tablename__ = "job_runs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    type: Mapped[str] = mapped_column(String(100), nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="queued")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="5")
    source: Mapped[str] = mapped_column(String(32), nullable=False, server_default="api")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A job not started by then is cancelled with code `expired` (beat slots use it: the next
    # slot does the work).
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))
    manual_retries: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # Takeovers of the last attempt from an owner not proven dead (migration 0009).
    lapses: Mapped[int] = mapped_column(SmallInteger, nullable=False, server_default="0")
    epoch: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("job_runs.id", ondelete="CASCADE")
    )
    children_total: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    children_pending: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONB)

    __table_args__ = (
        CheckConstraint(
            "status IN (" + ",".join(f"'{s}'" for s in JOB_STATUSES) + ")", name="status"
        ),
        CheckConstraint("attempts >= 0", name="attempts"),
        CheckConstraint("children_pending >= 0 AND children_pending <= children_total",
                        name="children"),
        Index("ix_job_runs_status_created", "status", "created_at"),
        Index("ix_job_runs_type_created", "type", "created_at"),
        Index("ix_job_runs_created_id", "created_at", "id"),
        # Partial indexes over the unfinished statuses (migration 0002, and
        # docs/job-table-at-scale.md for their plans at 10M rows).
        Index("ix_job_runs_unpublished", "updated_at", postgresql_where=text(
            "published_at IS NULL AND status IN ('queued','retrying')")),
        Index("ix_job_runs_undelivered",
              text("GREATEST(published_at, COALESCE(next_attempt_at, not_before, "
                   "'-infinity'))"),
              postgresql_where=text("delivered_at IS NULL AND published_at IS NOT NULL "
                                    "AND status IN ('queued','retrying')")),
        Index("ix_job_runs_running_lease", "lease_expires_at",
              postgresql_where=text("status = 'running'")),
        Index("ix_job_runs_unfinished", "status", "type", "created_at", postgresql_where=text(
            "status IN ('queued','running','retrying','waiting','dead')")),
        Index("ix_job_runs_parent", "parent_id", "created_at",
              postgresql_where=text("parent_id IS NOT NULL")),
    )


class ApiToken(Base):
    """A bearer token, stored as its SHA-256 only: the clear token is shown once."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False, unique=True)
    token_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(16)), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class OperatorAction(Base):
    """What an operator did, to how many jobs or rows, and why (who: the token's name)."""

    __tablename__ = "operator_log"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )
    actor: Mapped[str] = mapped_column(String(100), nullable=False)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    target: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    details: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class JobEvent(Base):
    """One status change of a job, appended by a trigger (migration 0006) and folded into
    job_stats by workers/stats.py, which deletes it."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("clock_timestamp()")
    )
    type: Mapped[str] = mapped_column(String(100), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    error_code: Mapped[str | None] = mapped_column(String(100))
    run_seconds: Mapped[float | None] = mapped_column(Float)
    wait_seconds: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int | None] = mapped_column(Integer)
    entry: Mapped[str | None] = mapped_column(String(200))


class JobStat(Base):
    """A cumulative figure (counter, histogram bucket, sum, schedule time) by kind, job type
    or schedule entry, and label: what /metrics reads instead of scanning job_runs."""

    __tablename__ = "job_stats"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    type: Mapped[str] = mapped_column(String(200), primary_key=True)
    label: Mapped[str] = mapped_column(String(200), primary_key=True)
    value: Mapped[float] = mapped_column(Float, nullable=False)
