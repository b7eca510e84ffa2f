"""Audit runs over HTTP: the runs, one run's findings (paged by cursor, filtered by check)
and a fix run's changed rows. Running an audit is a job (`POST /v1/jobs` with
`audit.integrity`); undoing a fix is `warden audit undo`, an operator action."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from starlette.concurrency import run_in_threadpool

from api_stub import cursors
from api_stub.auth import require
from api_stub.contract import links
from domain import rules
from tasks.audits import service
from tasks.audits.schemas import (
    AuditRunDetail,
    AuditRunOut,
    AuditRunPage,
    ChangeOut,
    ChangePage,
    FindingOut,
    FindingPage,
)
from workers.db import session_scope
from workers.tokens import Principal

router = APIRouter(prefix="/v1/audits", tags=["audits"])
CHECK_PATTERN = "^(" + "|".join(rules.INTEGRITY_CHECKS) + ")$"
# The `cursor` query parameter of the id-paged lists (audits, reports, validation): any
# string matching its pattern is a position, anything else is the usual 422.
IdCursor = Annotated[str | None, Query(pattern=cursors.ID_PATTERN,
                                       description=cursors.DESCRIPTION)]


def after_cursor(cursor: str | None) -> int | None:
    """The id a cursor (already matched against its pattern) stands for."""
    return None if cursor is None else cursors.decode_id(cursor)


def _list(limit: int, before: int | None) -> AuditRunPage:
    with session_scope() as s:
        rows = service.list_runs(s, limit=limit + 1, before_id=before)
    items = [AuditRunOut(**r) for r in rows[:limit]]
    more = len(rows) > limit
    return AuditRunPage(items=items,
                        next_cursor=cursors.encode_id(items[-1].id) if more else None)


def _detail(run_id: int, check: str | None, limit: int,
            after: tuple[str, int] | None) -> AuditRunDetail:
    with session_scope() as s:
        try:
            run = service.get_run(s, run_id)
        except service.AuditRunNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        rows = service.findings(s, run_id, check=check, limit=limit + 1, after=after)
    items = [FindingOut(**r) for r in rows[:limit]]
    cursor = (cursors.encode_finding(items[-1].check, items[-1].id) if len(rows) > limit
              else None)
    return AuditRunDetail(run=AuditRunOut(**run),
                          findings=FindingPage(items=items, next_cursor=cursor))


def _changes(run_id: int, limit: int, after: int | None) -> ChangePage:
    with session_scope() as s:
        try:
            service.get_run(s, run_id)
        except service.AuditRunNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        rows = service.changes(s, run_id, limit=limit + 1, after_id=after)
    items = [ChangeOut(**r) for r in rows[:limit]]
    cursor = cursors.encode_id(items[-1].id) if len(rows) > limit else None
    return ChangePage(items=items, next_cursor=cursor)


@router.get("", response_model=AuditRunPage, openapi_extra=links((200,), **{
    "GetAudit": ("GET", "/v1/audits/{run_id}", {"run_id": "$response.body#/items/0/id"}),
    "GetAuditChanges": ("GET", "/v1/audits/{run_id}/changes",
                        {"run_id": "$response.body#/items/0/id"})}))
async def list_audits(
    _: Annotated[Principal, Depends(require("read"))],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: IdCursor = None,
) -> AuditRunPage:
    """Audit runs, newest first; pass next_cursor back for the next page."""
    before = after_cursor(cursor)
    return await run_in_threadpool(_list, limit, before)


@router.get("/{run_id}", response_model=AuditRunDetail)
async def get_audit(
    run_id: Annotated[int, Path(ge=1)],
    _: Annotated[Principal, Depends(require("read"))],
    check: Annotated[str | None, Query(pattern=CHECK_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(pattern=cursors.FINDING_PATTERN,
                                        description=cursors.DESCRIPTION)] = None,
) -> AuditRunDetail:
    """One run with a page of its findings, ordered by check and id (optionally of one
    check); pass findings.next_cursor back for the next page."""
    after = cursors.decode_finding(cursor) if cursor is not None else None
    return await run_in_threadpool(_detail, run_id, check, limit, after)


@router.get("/{run_id}/changes", response_model=ChangePage)
async def get_audit_changes(
    run_id: Annotated[int, Path(ge=1)],
    _: Annotated[Principal, Depends(require("read"))],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: IdCursor = None,
) -> ChangePage:
    """A fix run's changed rows with their before and after values (what an undo uses)."""
    after = after_cursor(cursor)
    return await run_in_threadpool(_changes, run_id, limit, after)
