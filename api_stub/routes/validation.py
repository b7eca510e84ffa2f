"""Validation over HTTP: sweeps (counts, plan, watermark) and the issues per character with
their lifecycle. A sweep is a job (`POST /v1/jobs` with `validation.characters`); its chunk
jobs are listed under it by the job API."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from starlette.concurrency import run_in_threadpool

from api_stub.auth import require
from api_stub.contract import links
from api_stub.cursors import encode_id as encode_cursor
from api_stub.routes.audits import IdCursor, after_cursor
from domain import checks, rules
from tasks.validation import service
from tasks.validation.schemas import IssueOut, IssuePage, SweepOut, SweepPage
from workers.db import session_scope
from workers.tokens import Principal

router = APIRouter(prefix="/v1/validation", tags=["validation"])
RULE_PATTERN = "^(" + "|".join(checks.VALIDATION_RULES) + ")$"
SEVERITY_PATTERN = "^(" + "|".join(rules.SEVERITIES) + ")$"


def _sweeps(limit: int, before: int | None) -> SweepPage:
    with session_scope() as s:
        rows = service.list_sweeps(s, limit=limit + 1, before_id=before)
    items = [SweepOut(**r) for r in rows[:limit]]
    return SweepPage(items=items,
                     next_cursor=encode_cursor(items[-1].id) if len(rows) > limit else None)


def _sweep(sweep_id: int) -> SweepOut:
    with session_scope() as s:
        try:
            return SweepOut(**service.get_sweep(s, sweep_id))
        except service.SweepNotFound as exc:
            raise HTTPException(404, str(exc)) from exc


def _issues(character_id: int | None, state: str, severity: str | None, rule: str | None,
            limit: int, before: int | None) -> IssuePage:
    with session_scope() as s:
        rows = service.issues(s, character_id=character_id, state=state, severity=severity,
                              rule=rule, limit=limit + 1, before_id=before)
    items = [IssueOut(**r) for r in rows[:limit]]
    return IssuePage(items=items,
                     next_cursor=encode_cursor(items[-1].id) if len(rows) > limit else None)


@router.get("/sweeps", response_model=SweepPage, openapi_extra=links((200,), GetSweep=(
    "GET", "/v1/validation/sweeps/{sweep_id}", {"sweep_id": "$response.body#/items/0/id"})))
async def list_sweeps(
    _: Annotated[Principal, Depends(require("read"))],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: IdCursor = None,
) -> SweepPage:
    """Sweeps, newest first."""
    before = after_cursor(cursor)
    return await run_in_threadpool(_sweeps, limit, before)


@router.get("/sweeps/{sweep_id}", response_model=SweepOut)
async def get_sweep(
    sweep_id: Annotated[int, Path(ge=1)],
    _: Annotated[Principal, Depends(require("read"))],
) -> SweepOut:
    """One sweep with its totals (the sum of its chunks' results)."""
    return await run_in_threadpool(_sweep, sweep_id)


@router.get("/issues", response_model=IssuePage)
async def list_issues(
    _: Annotated[Principal, Depends(require("read"))],
    character_id: Annotated[int | None, Query(ge=1)] = None,
    state: Literal["open", "resolved", "all"] = "open",
    severity: Annotated[str | None, Query(pattern=SEVERITY_PATTERN)] = None,
    rule: Annotated[str | None, Query(pattern=RULE_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: IdCursor = None,
) -> IssuePage:
    """Issues newest first: open (default), resolved, or all, per character if given."""
    before = after_cursor(cursor)
    return await run_in_threadpool(_issues, character_id, state, severity, rule, limit, before)
