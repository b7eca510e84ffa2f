"""Params of the report jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Health(BaseModel):
    """Compute the health report of DOMAIN.md over the last `period_hours`."""

    model_config = ConfigDict(extra="forbid")

    period_hours: int = Field(24, ge=1, le=24 * 366, description="the period every activity "
                                                                 "figure covers")
    alert: bool = Field(True, description="POST an alert to WARDEN_ALERT_WEBHOOK_URL when the "
                                          "report is degraded")


class DeliverAlert(BaseModel):
    """POST one degraded report's alert to the webhook."""

    model_config = ConfigDict(extra="forbid")

    report_id: int = Field(..., ge=1)


# -- what the API and the CLI show --------------------------------------------------------------

class HealthReportOut(BaseModel):
    """A stored report; `report` is DOMAIN.md's JSON shape {timestamp, period_hours, checks,
    health_score, status}."""

    id: int
    job_id: str | None
    created_at: datetime
    period_hours: int
    health_score: int
    status: str
    report: dict[str, Any]
    alert_state: str
    alert_job_id: str | None


class DeliveryOut(BaseModel):
    id: int
    job_id: str | None
    attempt: int
    at: datetime
    target: str
    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: int


class HealthReportDetail(HealthReportOut):
    deliveries: list[DeliveryOut]


class HealthHistory(BaseModel):
    items: list[HealthReportOut]
    next_cursor: str | None


class HealthOverview(BaseModel):
    latest: HealthReportOut | None
    history: HealthHistory
