"""Backups over HTTP: the list (size, age, verdict, restore time) and one backup's manifest and
verification report. Creating, verifying and pruning are jobs (`POST /v1/jobs` with
`backup.create`, `backup.verify`, `backup.prune`); restoring is `warden restore`, on purpose
not an endpoint (it can overwrite a database)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from starlette.concurrency import run_in_threadpool

from api_stub.auth import require
from api_stub.contract import links
from tasks.backups import service
from tasks.backups.schemas import BackupOut
from workers.db import session_scope
from workers.tokens import Principal

router = APIRouter(prefix="/v1/backups", tags=["backups"])


def _list(include_pruned: bool, limit: int, before: int | None) -> list[BackupOut]:
    with session_scope() as s:
        rows = service.list_backups(s, include_pruned=include_pruned, limit=limit,
                                    before_id=before)
    return [BackupOut(**r) for r in rows]


def _get(backup_id: int) -> BackupOut | None:
    with session_scope() as s:
        row = service.get_backup(s, backup_id)
    return BackupOut(**row) if row else None


@router.get("", response_model=list[BackupOut], openapi_extra=links((200,), GetBackup=(
    "GET", "/v1/backups/{backup_id}", {"backup_id": "$response.body#/0/id"})))
async def list_backups(
    _: Annotated[Principal, Depends(require("read"))],
    include_pruned: bool = False,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(ge=1, description="page: ids below this")] = None,
) -> list[BackupOut]:
    """Backups, newest first."""
    return await run_in_threadpool(_list, include_pruned, limit, before)


@router.get("/{backup_id}", response_model=BackupOut)
async def get_backup(
    backup_id: Annotated[int, Path(ge=1)],
    _: Annotated[Principal, Depends(require("read"))],
) -> BackupOut:
    """One backup with its row counts and its last verification report."""
    found = await run_in_threadpool(_get, backup_id)
    if found is None:
        raise HTTPException(404, f"no backup {backup_id}")
    return found
