"""Health reports over HTTP: the latest report with a page of its history, and one report
with its alert's delivery attempts. A report is a job (`POST /v1/jobs` with
`report.health`); beat runs one hourly."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from starlette.concurrency import run_in_threadpool

from api_stub.auth import require
from api_stub.contract import links
from api_stub.cursors import encode_id
from api_stub.routes.audits import IdCursor, after_cursor
from tasks.reports import service
from tasks.reports.schemas import (
    DeliveryOut,
    HealthHistory,
    HealthOverview,
    HealthReportDetail,
    HealthReportOut,
)
from workers.db import session_scope
from workers.tokens import Principal

router = APIRouter(prefix="/v1/reports", tags=["reports"])


def _overview(limit: int, before: int | None) -> HealthOverview:
    with session_scope() as s:
        latest = service.history(s, limit=1)
        rows = service.history(s, limit=limit + 1, before_id=before)
    items = [HealthReportOut(**r) for r in rows[:limit]]
    cursor = encode_id(items[-1].id) if len(rows) > limit else None
    return HealthOverview(latest=HealthReportOut(**latest[0]) if latest else None,
                          history=HealthHistory(items=items, next_cursor=cursor))


def _one(report_id: int) -> HealthReportDetail:
    with session_scope() as s:
        try:
            found = service.get_report(s, report_id)
        except service.ReportNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        sent = service.deliveries(s, report_id)
    return HealthReportDetail(**found, deliveries=[DeliveryOut(**d) for d in sent])


@router.get("/health", response_model=HealthOverview, openapi_extra=links((200,), GetReport=(
    "GET", "/v1/reports/health/{report_id}", {"report_id": "$response.body#/history/items/0/id"})))
async def health(
    _: Annotated[Principal, Depends(require("read"))],
    limit: Annotated[int, Query(ge=1, le=500)] = 24,
    cursor: IdCursor = None,
) -> HealthOverview:
    """The latest health report, and the history newest first (next_cursor pages back)."""
    before = after_cursor(cursor)
    return await run_in_threadpool(_overview, limit, before)


@router.get("/health/{report_id}", response_model=HealthReportDetail)
async def health_report(
    report_id: Annotated[int, Path(ge=1)],
    _: Annotated[Principal, Depends(require("read"))],
) -> HealthReportDetail:
    """One report with every delivery attempt of its alert."""
    return await run_in_threadpool(_one, report_id)
