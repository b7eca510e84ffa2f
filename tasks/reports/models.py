"""Report tables: every health report (history, not just the latest) and each delivery
attempt of its alert, so an operator can see whether and when the webhook took it."""

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
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from workers.db import Base

HEALTH_STATUSES = ("healthy", "degraded")
# none: healthy, nothing to send; not_requested: degraded but alerts were off for this run;
# no_webhook: degraded, WARDEN_ALERT_WEBHOOK_URL unset; queued/delivered/failed: the
# report.deliver_alert job's state.
ALERT_STATES = ("none", "not_requested", "no_webhook", "queued", "delivered", "failed")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class HealthReport(Base):
    """One report.health run: the DOMAIN.md report as JSON, its score and status."""

    __tablename__ = "health_reports"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now())
    period_hours: Mapped[int] = mapped_column(Integer, nullable=False)
    health_score: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    report: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    alert_state: Mapped[str] = mapped_column(String(16), nullable=False)
    alert_job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))

    __table_args__ = (
        CheckConstraint(_in("status", HEALTH_STATUSES), name="status"),
        CheckConstraint(_in("alert_state", ALERT_STATES), name="alert_state"),
        Index("uq_health_reports_job_id", "job_id", unique=True,
              postgresql_where="job_id IS NOT NULL"),
        Index("ix_health_reports_created", "created_at", "id"),
    )


class AlertDelivery(Base):
    """One POST of a degraded report's alert to the webhook, whatever its outcome."""

    __tablename__ = "health_alert_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    report_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("health_reports.id", ondelete="CASCADE"), nullable=False)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now())
    target: Mapped[str] = mapped_column(String(200), nullable=False)  # host only: no secrets
    ok: Mapped[bool] = mapped_column(Boolean, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer, nullable=False)

    __table_args__ = (Index("ix_health_alert_deliveries_report", "report_id", "id"),)
