"""Who may submit which job: one rule for every place that submits on a principal's behalf.

A token's scope used to be checked per route: `POST /v1/jobs` wanted `enqueue` for any type,
so a service token could prune every backup or reverse a migration while the routes that
steer the same things wanted `admin` (review 2026-12-07, N3). Now each job type says what
it needs (`JobTask.scope`, raised to admin by the params named in `JobTask.admin_when`),
and `check` is the one decision, called by the API (`POST /v1/jobs`, the migration routes)
and by the operations page before anything is written. The CLI acts with the database's
credentials (an operator) and checks no scope; it still names itself as the principal.

Who asked, in the operator log, is the principal too, never a client's word: a params field
marked `PRINCIPAL_FIELD` (migration.reverse's `actor`) is overwritten by `on_behalf_of`
with the token's name (API, /ui) or `cli:<login>` (CLI) before the params are validated
and stored, so the job record says who submitted it. The field stays in the model so that
messages queued before this change still validate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from workers.tokens import Principal

# json_schema_extra of a params field that names who asked: readOnly tells clients (the
# catalogue, OpenAPI) that the server sets it; the x- key is what on_behalf_of looks for.
PRINCIPAL_MARK = "x-warden-principal"
PRINCIPAL_FIELD: dict[str, Any] = {"readOnly": True, PRINCIPAL_MARK: True}


class ScopeRequired(PermissionError):
    """The principal lacks the scope this job type (with these params) needs: a 403."""

    def __init__(self, job_type: str, scope: str, raised_by: Mapping[str, Any] | None) -> None:
        when = ""
        if raised_by:
            when = " when " + " or ".join(f"{k}={json.dumps(v, default=str)}"
                                          for k, v in raised_by.items())
        super().__init__(f"job type {job_type!r} needs the {scope!r} scope{when}")
        self.job_type = job_type
        self.scope = scope


def _task(job_type: str) -> Any:
    from workers.celery_app import job_types

    return job_types().get(job_type)


def required_scope(job_type: str, params: BaseModel | Mapping[str, Any] | None = None) -> str:
    """The scope submitting `job_type` with `params` needs (without params: whatever the
    params). An unknown type needs `enqueue`: the submit then refuses it by name (422)."""
    task = _task(job_type)
    return "enqueue" if task is None else str(task.required_scope(params))


def check(principal: Principal, job_type: str,
          params: BaseModel | Mapping[str, Any] | None = None) -> None:
    """Raise ScopeRequired unless `principal` may submit `job_type` with `params`.

    Call it with the raw params before validating (a refusal needs no valid params) and
    again with the validated ones (defaults and coercions count): both through here."""
    scope = required_scope(job_type, params)
    if principal.allows(scope):
        return
    task = _task(job_type)
    base = "enqueue" if task is None else str(task.scope)
    raised = None if base == scope or task is None else dict(task.admin_when or {})
    raise ScopeRequired(job_type, scope, raised)


def principal_fields(model: type[BaseModel]) -> list[str]:
    """The params fields of `model` that a producer sets from its principal."""
    return [name for name, f in model.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get(PRINCIPAL_MARK)]


def on_behalf_of(job_type: str, params: Mapping[str, Any] | None, who: str) -> dict[str, Any]:
    """`params` with every principal field set to `who`, whatever the client sent there."""
    out = dict(params or {})
    task = _task(job_type)
    if task is not None and task.params is not None:
        for name in principal_fields(task.params):
            out[name] = who
    return out
