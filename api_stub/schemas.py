"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_COUNTDOWN = 3600  # == workers.enqueue.MAX_COUNTDOWN (below the visibility timeout)
KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"  # printable ASCII, no spaces: safe in headers and logs


class JobIn(BaseModel):
    """POST /v1/jobs."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(..., min_length=1, max_length=100, examples=["platform.ping"])
    params: dict[str, Any] = Field(default_factory=dict, examples=[{"echo": "hello"}])
    idempotency_key: str | None = Field(None, pattern=KEY_PATTERN)
    countdown: float | None = Field(None, ge=0, le=MAX_COUNTDOWN, description="seconds to wait")


class JobErrorOut(BaseModel):
    code: str | None
    message: str | None


class JobOut(BaseModel):
    """A job as stored: what was asked, where it is, and its result or error."""

    id: uuid.UUID
    type: str
    params: dict[str, Any]
    idempotency_key: str | None
    status: str
    attempts: int
    max_attempts: int
    source: str
    created_at: datetime
    updated_at: datetime
    not_before: datetime | None
    expires_at: datetime | None
    published_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None
    result: Any | None
    error: JobErrorOut | None
    worker: str | None
    manual_retries: int
    epoch: int = Field(0, description="ownership epoch: +1 at every claim")
    lease_expires_at: datetime | None = None
    delivered_at: datetime | None = None
    parent_id: uuid.UUID | None = None
    children_total: int = 0
    children_pending: int = 0
    children: dict[str, int] | None = Field(None, description="children by status (GET one)")
    progress: dict[str, Any] | None = None
    waiting_on: dict[str, Any] | None = Field(
        None, description="why it is not running (GET one): reason, message, details")

    @classmethod
    def from_row(cls, row: Any) -> JobOut:
        data = dict(row)
        if not isinstance(data.get("params"), dict):  # a bare `celery call` payload
            data["params"] = {"_raw": data.get("params")}
        code, message = data.pop("error_code"), data.pop("error_message")
        data["error"] = JobErrorOut(code=code, message=message) if code or message else None
        return cls.model_validate(data)


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class JobTypeOut(BaseModel):
    name: str
    description: str
    singleton: bool
    max_attempts: int
    params_schema: dict[str, Any]


class ReasonIn(BaseModel):
    """An operator action's reason (recorded in the operator log)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(..., min_length=1, max_length=1000, pattern=r"\S",
                        examples=["dependency fixed: INC-231"])


class BulkIn(ReasonIn):
    """Retry or cancel by filter. `status` must be one the action touches (retry: failed,
    dead; cancel: queued, retrying), or omitted for all of them; times bound created_at."""

    status: str | None = Field(None, max_length=16)
    type: str | None = Field(None, max_length=100)
    created_after: datetime | None = None
    created_before: datetime | None = None
    dry_run: bool = False


class BulkResult(BaseModel):
    action: str
    matched: int
    changed: int
    dry_run: bool


class OperatorLogEntry(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    reason: str
    count: int
    details: dict[str, Any] | None


class OperatorLogPage(BaseModel):
    items: list[OperatorLogEntry]
    next_before_id: int | None
