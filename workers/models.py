"""Platform tables: the job record (the source of truth for every job) and API tokens."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from workers.db import Base

JOB_STATUSES = ("queued", "running", "retrying", "succeeded", "failed", "dead", "cancelled")
FINAL_STATUSES = frozenset({"succeeded", "failed", "dead", "cancelled"})
RETRYABLE_BY_OPERATOR = frozenset({"failed", "dead"})
SCOPES = ("read", "enqueue", "admin")


class JobRun(Base):
    """One job: what was asked, each attempt's outcome, and the result.

    `published_at` NULL on a queued job means the broker never confirmed it (the outbox
    relay publishes it). `id` is also the Celery task id.
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

    __table_args__ = (
        CheckConstraint(
            "status IN (" + ",".join(f"'{s}'" for s in JOB_STATUSES) + ")", name="status"
        ),
        CheckConstraint("attempts >= 0", name="attempts"),
        Index("ix_job_runs_status_created", "status", "created_at"),
        Index("ix_job_runs_type_created", "type", "created_at"),
        Index("ix_job_runs_created_id", "created_at", "id"),
        # The relay's scan: only the few rows that still await a publish.
        Index(
            "ix_job_runs_unpublished",
            "created_at",
            postgresql_where=text("published_at IS NULL AND status = 'queued'"),
        ),
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
