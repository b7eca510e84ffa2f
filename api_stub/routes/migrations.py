"""Data migrations over HTTP: list them with state and progress; pause, resume, cancel, retry.

Starting one is a job like any other (`POST /v1/jobs` with type `migration.run`); these
routes steer the migration itself. Operator actions need the `admin` scope and a reason,
and are written to the operator log in the same transaction as the change.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from api_stub.auth import require
from api_stub.contract import links
from api_stub.schemas import REASON_PATTERN
from tasks.data_migrations import service
from workers import jobstore, oplog, scopes
from workers.db import session_scope
from workers.enqueue import publish, submit
from workers.tokens import Principal

router = APIRouter(prefix="/v1/migrations", tags=["data migrations"])

class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500, pattern=REASON_PATTERN,
                        description="why (operator log)")


class OptionalReason(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, min_length=1, max_length=500, pattern=REASON_PATTERN)


def _may_run(who: Principal, name: str) -> None:
    """The scope the migration.run these routes submit needs, decided where every job's is
    (workers.scopes), before any state changes: the route's own scope is not the rule."""
    try:
        scopes.check(who, "migration.run", {"name": name})
    except scopes.ScopeRequired as exc:
        raise HTTPException(403, str(exc)) from exc


def _conflict(when: str) -> dict[int | str, dict[str, Any]]:
    return {409: {"description": f"the migration is not {when}"}}


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a service call in one transaction; its errors as HTTP statuses."""
    try:
        with session_scope() as s:
            return fn(s, *args, **kwargs)
    except service.MigrationUnknown as exc:
        raise HTTPException(404, str(exc)) from exc
    except service.MigrationConflict as exc:
        raise HTTPException(409, str(exc)) from exc
    except oplog.ReasonRequired as exc:
        raise HTTPException(422, [{"loc": ["body", "reason"], "msg": str(exc),
                                   "type": "value_error"}]) from exc


_NAME = {"name": "$response.body#/0/name"}


@router.get("", openapi_extra=links((200,), **{
    f"{verb.capitalize()}Migration": (method, "/v1/migrations/{name}" + suffix, _NAME)
    for verb, method, suffix in (("get", "GET", ""), ("batches", "GET", "/batches"),
                                 ("rejects", "GET", "/rejects"), ("pause", "POST", "/pause"),
                                 ("resume", "POST", "/resume"), ("cancel", "POST", "/cancel"),
                                 ("retry", "POST", "/retry"))}))
def list_migrations(_: Annotated[Principal, Depends(require("read"))]) -> list[dict[str, Any]]:
    """Every registered migration: status, progress, rows/s, ETA (running time only), last
    error, attempts."""
    return _call(service.list_migrations)


@router.get("/{name}")
def get_migration(name: str, _: Annotated[Principal, Depends(require("read"))],
                  batches: Annotated[int, Query(ge=0, le=500)] = 20) -> dict[str, Any]:
    """One migration with its newest batches and pauses."""

    def detail(s: Any) -> dict[str, Any]:
        out = service.summary(s, name)
        out["batches"] = service.batches(s, name, limit=batches)
        out["pauses"] = service.pauses(s, name, limit=20)
        return out

    return _call(detail)


@router.get("/{name}/batches")
def list_batches(name: str, _: Annotated[Principal, Depends(require("read"))],
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                 status: Annotated[str | None,
                                   Query(pattern="^(succeeded|split|retrying|failed)$")] = None,
                 ) -> list[dict[str, Any]]:
    """Batch records, newest first: bounds, rows, lock seconds, attempts, error."""
    return _call(service.batches, name, limit=limit, status=status)


@router.get("/{name}/rejects")
def list_rejects(name: str, _: Annotated[Principal, Depends(require("read"))],
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                 after_id: Annotated[int | None, Query(ge=0)] = None) -> list[dict[str, Any]]:
    """Records that could not be migrated: character (row_id), position, reason, record."""
    return _call(service.rejects, name, limit=limit,
                 after_id=after_id)


@router.post("/{name}/pause", responses=_conflict("queued or running"))
def pause(name: str, body: Reason,
          who: Annotated[Principal, Depends(require("admin"))]) -> dict[str, Any]:
    """Stop after the current batch; the run's job ends (no lock, no worker held)."""
    return _call(service.pause, name, actor=who.name,
                 reason=body.reason)


@router.post("/{name}/resume", responses=_conflict("paused"))
def resume(name: str, body: OptionalReason,
           who: Annotated[Principal, Depends(require("admin"))]) -> dict[str, Any]:
    """Queue a new run that starts at the checkpoint (committed with the state change)."""
    _may_run(who, name)
    resumed: service.Resumed = _call(service.resume_run, name, actor=who.name,
                                     reason=body.reason or "resumed by an operator",
                                     source="api")
    resumed.publish()  # committed; if this send fails, the relay sends it
    out = dict(resumed.summary)
    out["job_id"] = resumed.job_id
    return out


@router.post("/{name}/cancel", responses=_conflict("cancellable in its state"))
def cancel(name: str, body: Reason,
           who: Annotated[Principal, Depends(require("admin"))]) -> dict[str, Any]:
    """Stop for good after the current batch (done batches stay done)."""
    return _call(service.cancel, name, actor=who.name,
                 reason=body.reason)


@router.post("/{name}/retry", responses=_conflict("failed"))
def retry(name: str, body: OptionalReason,
          who: Annotated[Principal, Depends(require("admin"))]) -> dict[str, Any]:
    """Run a failed migration again from its checkpoint (its failed job, retried)."""
    _may_run(who, name)
    plan: service.RetryPlan = _call(service.retry, name, actor=who.name,
                                    reason=body.reason or "retried by an operator")
    return {"name": name, "job_id": retry_plan(plan)}


def retry_plan(plan: service.RetryPlan) -> str:
    """Execute a retry plan: the failed job through the core's retry, else a new run."""
    if plan.job_id is not None:
        try:
            row = jobstore.operator_retry(plan.job_id)
        except jobstore.JobStateConflict:
            pass  # retried meanwhile by someone else: submit below dedupes by key
        else:
            publish(row["id"], row["type"], row["params"])
            return str(row["id"])
    sub = submit("migration.run", plan.params, idempotency_key=plan.key, source="api")
    return str(sub.job["id"])
