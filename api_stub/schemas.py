"""Request and response bodies of the HTTP API."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from api_stub import cursors

MAX_COUNTDOWN = 3600  # == workers.enqueue.MAX_COUNTDOWN (below the visibility timeout)
KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"  # printable ASCII, no spaces: safe in headers and logs
# PostgreSQL text and jsonb cannot hold U+0000: the API refuses it (422) in every string it
# stores or compares, and says so in the document.
NO_NUL = r"^[^\x00]*$"
# RFC 3339 date-time, what OpenAPI's `format: date-time` means: pydantic alone would also take
# a bare date, a naive time or a number of seconds, none of which the document admits.
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                      r"([Zz]|[+-][0-9]{2}:[0-9]{2})")


def _rfc3339(value: Any) -> Any:
    if isinstance(value, str) and not _RFC3339.fullmatch(value):
        raise ValueError("not an RFC 3339 date-time (2026-01-31T12:00:00Z)")
    if not isinstance(value, str | datetime):
        raise ValueError("a date-time is a string (RFC 3339)")
    return value


DateTime = Annotated[datetime, BeforeValidator(_rfc3339)]
# An operator's reason: no NUL, and one character that is neither a control nor a blank by
# any of the definitions in play (JSON Schema's \s, pydantic's, str.strip's in oplog), so the
# document, the model and the operator log agree on what a blank reason is.
_BLANK = r"\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
REASON_PATTERN = rf"^[^\x00]*[^{_BLANK}][^\x00]*$"


class JobIn(BaseModel):
    """POST /v1/jobs."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(..., min_length=1, max_length=100, examples=["platform.ping"])
    params: dict[str, Any] = Field(default_factory=dict, examples=[{"echo": "hello"}])
    idempotency_key: str | None = Field(
        None, pattern=KEY_PATTERN,
        description="the same key again returns the first job; the `Idempotency-Key` "
                    "header, when sent, takes precedence over this field")
    # strict: a number, not a numeric string or a boolean (the document says number)
    countdown: float | None = Field(None, ge=0, le=MAX_COUNTDOWN, strict=True,
                                    description="seconds to wait")


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
    next_cursor: str | None = Field(..., pattern=cursors.JOB_PATTERN)


class JobTypeOut(BaseModel):
    name: str
    description: str
    scope: Literal["enqueue", "admin"] = Field(
        description="the token scope POST /v1/jobs needs for this type, whatever its params")
    admin_when: dict[str, Any] | None = Field(
        None, description="params that raise the scope to admin: any of these fields with "
                          "this value (e.g. {\"fix\": true}); null: the params never do")
    singleton: bool
    max_attempts: int
    params_schema: dict[str, Any]


class ReasonIn(BaseModel):
    """An operator action's reason (recorded in the operator log)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(..., min_length=1, max_length=1000, pattern=REASON_PATTERN,
                        examples=["dependency fixed: INC-231"])


class BulkIn(ReasonIn):
    """Retry or cancel by filter. `status` must be one the action touches (retry: failed,
    dead; cancel: queued, retrying), or omitted for all of them; times bound created_at."""

    status: str | None = Field(None, max_length=16)
    type: str | None = Field(None, max_length=100, pattern=NO_NUL)
    created_after: DateTime | None = None
    created_before: DateTime | None = None
    dry_run: bool = Field(False, strict=True)  # true or false, not 0 or "yes"


class RetryFilterIn(BulkIn):
    """POST /v1/jobs/retry: the statuses a retry touches are the only ones it accepts."""

    status: Literal["failed", "dead"] | None = None


class CancelFilterIn(BulkIn):
    """POST /v1/jobs/cancel: the statuses a cancel touches are the only ones it accepts."""

    status: Literal["queued", "retrying"] | None = None


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


class ErrorOut(BaseModel):
    """The body of every error but a validation error: 401, 403, 404, 409, 413, 503."""

    detail: str


class FieldError(BaseModel):
    """One validation error: where (`loc`, e.g. ["body", "params", "echo"]), what, its kind."""

    loc: list[str | int]
    msg: str
    type: str
    known_types: list[str] = Field(
        default_factory=list, description="the registered job types (type unknown_job_type)")


class ValidationErrorOut(BaseModel):
    """A 422: every validation error of the request, body, query, path or header."""

    detail: list[FieldError]


class DependencyCheck(BaseModel):
    ok: bool
    latency_ms: float
    error: str | None = Field(None, description="the exception's type when not ok")


class ReadyOut(BaseModel):
    """GET /readyz: 200 when every dependency answers, 503 with the same body otherwise."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, DependencyCheck]
