"""The HTTP API: enqueue jobs, read and steer them, health and metrics.

Endpoints are sync functions on purpose: the database and the Celery producer are blocking
clients, and FastAPI runs sync endpoints in its thread pool.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import psycopg
import sqlalchemy.exc
import structlog
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from sqlalchemy import text
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from api_stub import contract, cursors
from api_stub.auth import require
from api_stub.middleware import BodyLimit, Observe
from api_stub.schemas import (
    KEY_PATTERN,
    NO_NUL,
    BulkIn,
    BulkResult,
    CancelFilterIn,
    JobIn,
    JobOut,
    JobPage,
    JobTypeOut,
    OperatorLogPage,
    ReadyOut,
    ReasonIn,
    RetryFilterIn,
)
from workers import jobstore, metrics, operator, oplog, scopes, why
from workers.db import AsyncPool, PoolTimeout, session_scope
from workers.enqueue import (
    IdempotencyConflict,
    InvalidCountdown,
    UnknownJobType,
    UnstorableParams,
    job_types,
    prepare,
    publisher,
    submit_async,
)
from workers.jobs import describe
from workers.models import JOB_STATUSES
from workers.redis_client import get_redis
from workers.relay import Relay
from workers.settings import get_settings
from workers.tokens import Principal, TokenCache

log = structlog.get_logger("warden.api")


class JobIdSegment(StringConvertor):
    """`{job_id:job_id}`: any segment but the bulk actions' paths. The document (like OpenAPI
    routing) has /v1/jobs/cancel mean the bulk cancel only, so GET /v1/jobs/cancel is a 405,
    not a malformed job id; any other segment still reaches the route (422 when not a UUID)."""

    regex = r"(?!(?:retry|cancel)$)[^/]+"


register_url_convertor("job_id", JobIdSegment())


def _field_errors(exc: ValidationError, prefix: tuple[str | int, ...]) -> list[dict[str, Any]]:
    return [
        {"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


def _unprocessable(detail: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": detail})


def create_app(*, run_relay: bool = True) -> FastAPI:
    """Build the app. The relay runs inside each API process (one at a time, by lease)."""
    settings = get_settings()
    token_cache = TokenCache(settings.token_cache_seconds)
    relay = Relay()
    db_pool = AsyncPool()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        job_types()  # import the task registry before the first request
        if run_relay:
            relay.start()
        yield
        relay.stop()
        await db_pool.close()

    app = FastAPI(
        title="Warden",
        version="0.1.0",
        description="Enqueue and watch the maintenance jobs of the character service.",
        lifespan=lifespan,
    )
    app.state.token_cache = token_cache

    # -- errors: a client never gets a 500 for what it sent ------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail: list[dict[str, Any]] = []
        for e in exc.errors():
            loc = list(e.get("loc", ()))
            if loc == ["body"] and e.get("type") == "missing":
                # No body at all: name the fields it needs (a retry without a body said only
                # "Field required" at ["body"], never `reason`: drill D7).
                detail += _missing_body_fields(request)
                if detail:
                    continue
            detail.append({"loc": loc, "msg": e.get("msg", ""), "type": e.get("type", "")})
        return _unprocessable(detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        # FastAPI answers 400 when a body is not even text (bytes that are not UTF-8); that
        # is an invalid body like any other, so it gets the same 422 and shape.
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
            return _unprocessable([{"loc": ["body"], "msg": "body is not UTF-8 JSON",
                                    "type": "json_invalid"}])
        if exc.status_code == 405:
            allow = ", ".join(contract.allowed_methods(request.app, request.url.path))
            exc = StarletteHTTPException(405, exc.detail, headers={"Allow": allow})
        return await http_exception_handler(request, exc)

    async def _db_down(_: Request, exc: Exception) -> JSONResponse:
        log.error("api.database_unavailable", error=describe(exc))
        return JSONResponse(status_code=503, content={"detail": "database unavailable"},
                            headers={"Retry-After": "5"})

    # Connection lost, pool exhausted under load: the client should come back, not see a 500.
    for unavailable in (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                        sqlalchemy.exc.TimeoutError, psycopg.OperationalError,
                        psycopg.InterfaceError, PoolTimeout):
        app.add_exception_handler(unavailable, _db_down)

    @app.exception_handler(sqlalchemy.exc.DataError)
    @app.exception_handler(psycopg.DataError)
    async def _unstorable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("api.unstorable_value", error=describe(exc))
        return _unprocessable([{"loc": ["body"], "type": "value_error",
                                "msg": "a value cannot be stored: " + describe(exc)}])

    # -- jobs ----------------------------------------------------------------------------------

    @app.post("/v1/jobs", status_code=202, response_model=JobOut,
              responses={200: {"model": JobOut,
                               "description": "same idempotency key: the first job"},
                         403: {"description": "the token lacks the `enqueue` scope, or the "
                                              "scope this job type needs with these params "
                                              "(GET /v1/job-types: `scope`, `admin_when`)"},
                         409: {"description": "the idempotency key was used for another job"},
                         422: {"description": "invalid body or params (`loc` names the field); "
                                              "an unknown type lists `known_types`"}},
              openapi_extra=contract.links((200, 202), **_job_links("#/id")))
    async def enqueue(
        body: JobIn,
        who: Annotated[Principal, Depends(require("enqueue"))],
        idempotency_key: Annotated[str | None, Header(
            pattern=KEY_PATTERN,
            description="the job's idempotency key; when the body has `idempotency_key` "
                        "too, this header wins (the body's is ignored)")] = None,
    ) -> Any:
        """Accept a job: 202 with the new job, or 200 with the job an earlier request made.
        The job type may need more than `enqueue` (GET /v1/job-types): 403 naming it."""
        # async, with no thread-pool hop: the insert runs on an async connection and the
        # publish on the loop (bench/: a hop cost more CPU than the insert).
        # One documented precedence, so that every request the document admits is served
        # (a 422 for a header differing from the body could not be stated in OpenAPI).
        key = idempotency_key if idempotency_key is not None else body.idempotency_key
        # The type's scope first (a refusal needs no valid params), then again on the
        # validated params (defaults count); who asked is the token, never a param.
        _authorize(who, body.type, body.params)
        params = scopes.on_behalf_of(body.type, body.params, who.name)
        task = job_types().get(body.type)
        if task is not None and (wrong := contract.check_params(task.params, params)):
            return _unprocessable([{**e, "loc": ["body", "params", *e["loc"]]} for e in wrong])
        try:
            prepared = prepare(body.type, params, idempotency_key=key,
                               countdown=body.countdown, client_key=True)
            _authorize(who, body.type, prepared.clean)
            async with db_pool.connection() as conn:
                sub = await submit_async(prepared, conn)
        except UnknownJobType as exc:
            return _unprocessable([{"loc": ["body", "type"], "msg": str(exc),
                                    "type": "unknown_job_type", "known_types": exc.known}])
        except ValidationError as exc:
            return _unprocessable(_field_errors(exc, ("body", "params")))
        except UnstorableParams as exc:
            return _unprocessable([{"loc": ["body", "params"], "msg": str(exc),
                                    "type": "value_error"}])
        except InvalidCountdown as exc:
            return _unprocessable([{"loc": ["body", "countdown"], "msg": str(exc),
                                    "type": "value_error"}])
        except IdempotencyConflict as exc:
            raise HTTPException(409, str(exc)) from exc
        # Serialized here, once: returned as a model, FastAPI would validate it again
        # against response_model (JobOut) before serializing it (bench/enqueue_api.py).
        return Response(JobOut.from_row(sub.job).model_dump_json(),
                        status_code=202 if sub.created else 200, media_type="application/json")

    @app.get("/v1/jobs/{job_id:job_id}", response_model=JobOut,
              dependencies=[Depends(require("read"))])
    def get_job(job_id: uuid.UUID) -> Any:
        """One job with its status, attempts, result or error."""
        row = jobstore.get(job_id)
        if row is None:
            raise HTTPException(404, f"no job {job_id}")
        return job_out(row)

    @app.get("/v1/jobs", response_model=JobPage,
              dependencies=[Depends(require("read"))],
              openapi_extra=contract.links((200,), **_job_links("#/items/0/id")))
    def list_jobs(
        status: Annotated[str | None, Query(pattern="^(" + "|".join(JOB_STATUSES) + ")$")] = None,
        type: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, Query(pattern=cursors.JOB_PATTERN,
                                            description=cursors.DESCRIPTION)] = None,
        parent_id: uuid.UUID | None = None,
    ) -> Any:
        """Newest first; pass next_cursor back to get the next page. `parent_id` lists a
        fanned-out job's children."""
        before = cursors.decode_job(cursor) if cursor else None
        # One row more than asked tells whether there is a next page.
        rows = jobstore.list_jobs(status=status, job_type=type, parent_id=parent_id,
                                  limit=limit + 1, before=before)
        items = [JobOut.from_row(r) for r in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = cursors.encode_job(items[-1].created_at, items[-1].id)
        return JobPage(items=items, next_cursor=next_cursor)

    @app.post("/v1/jobs/retry", response_model=BulkResult, responses=_TOO_MANY)
    def retry_jobs(body: RetryFilterIn,
                   who: Annotated[Principal, Depends(require("admin"))]) -> Any:
        """Retry every failed or dead job the filter matches (a dry run counts them); the
        relay publishes them in batches. Recorded in the operator log with the reason."""
        return _bulk("retry", body, who)

    @app.post("/v1/jobs/cancel", response_model=BulkResult, responses=_TOO_MANY)
    def cancel_jobs(body: CancelFilterIn,
                    who: Annotated[Principal, Depends(require("admin"))]) -> Any:
        """Cancel every queued or retrying job the filter matches (a dry run counts them)."""
        return _bulk("cancel", body, who)

    @app.post("/v1/jobs/{job_id}/retry", response_model=JobOut,
              responses={409: {"description": "the job is neither failed nor dead"}})
    def retry_job(job_id: uuid.UUID, body: ReasonIn,
                  who: Annotated[Principal, Depends(require("admin"))]) -> Any:
        """Run a failed or dead job again with a fresh attempt budget (409 otherwise)."""
        row = _operate(lambda j: operator.retry(j, actor=who.name, reason=body.reason), job_id)
        publisher.submit(row["id"], row["type"], row["params"])
        log.info("job.retry_requested", job_id=str(job_id), actor=who.name)
        return job_out(jobstore.get(job_id))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobOut,
              responses={409: {"description": "the job has started or ended"}})
    def cancel_job(job_id: uuid.UUID, body: ReasonIn,
                   who: Annotated[Principal, Depends(require("admin"))]) -> Any:
        """Cancel a job that has not started (queued or retrying); 409 for any other state."""
        row = _operate(lambda j: operator.cancel(j, actor=who.name, reason=body.reason), job_id)
        log.info("job.cancel_requested", job_id=str(job_id), actor=who.name)
        return job_out(row)

    @app.get("/v1/operator-log", response_model=OperatorLogPage,
             dependencies=[Depends(require("read"))])
    def operator_log(
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        before_id: Annotated[int | None, Query(ge=1)] = None,
        action: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    ) -> Any:
        """Who did what, to how many, and why; newest first (pass next_before_id back)."""
        with session_scope() as s:
            rows = oplog.entries(s, limit=limit + 1, before_id=before_id, action=action)
        items = rows[:limit]
        return {"items": items,
                "next_before_id": items[-1]["id"] if len(rows) > limit else None}

    @app.get("/v1/job-types", response_model=list[JobTypeOut],
              dependencies=[Depends(require("read"))])
    def list_job_types() -> Any:
        """Every job type with the scope submitting it needs and the JSON Schema of its
        params."""
        return job_type_catalogue()

    # -- health and metrics -------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        # async and without I/O: answered on the event loop, never queued behind the sync
        # routes' thread pool (which a stalled dependency can fill).
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyOut,
             responses={503: {"model": ReadyOut, "description": "a dependency is down"}})
    def readyz(response: Response) -> dict[str, Any]:
        """Readiness: each dependency checked; 503 when any is down."""
        checks: dict[str, dict[str, Any]] = {}
        for name, probe in (("database", _probe_db), ("redis", _probe_redis)):
            start = time.perf_counter()
            try:
                probe()
                checks[name] = {"ok": True}
            except Exception as exc:
                checks[name] = {"ok": False, "error": type(exc).__name__}
            checks[name]["latency_ms"] = round((time.perf_counter() - start) * 1000, 2)
        ok = all(c["ok"] for c in checks.values())
        response.status_code = 200 if ok else 503
        return {"status": "ready" if ok else "unavailable", "checks": checks}

    # Open by default, as Prometheus targets usually are on an internal network; it names
    # job types, counts and schedule entries, so WARDEN_METRICS_REQUIRE_TOKEN puts it behind
    # the `read` scope (Prometheus: `authorization: {credentials_file: ...}`).
    @app.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus text exposition",
        "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
        dependencies=[Depends(require("read"))] if settings.metrics_require_token else [])
    def prometheus() -> Response:
        """Prometheus exposition."""
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    for router in family_routers():
        app.include_router(router)
    family_metrics()
    app.add_middleware(Observe)
    app.add_middleware(BodyLimit)
    contract.install(app)  # after every router: it documents the routes it finds
    return app


def _missing_body_fields(request: Request) -> list[dict[str, Any]]:
    """One "Field required" per required field of the route's body model."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    fields = getattr(model, "model_fields", None) or {}
    return [{"loc": ["body", name], "msg": "Field required (send a JSON body)",
             "type": "missing"} for name, f in fields.items() if f.is_required()]


def _job_links(pointer: str) -> dict[str, tuple[str, str, dict[str, str]]]:
    """From a job in a response to what can be done with it."""
    job = {"job_id": "$response.body" + pointer}
    return {"GetJob": ("GET", "/v1/jobs/{job_id}", job),
            "CancelJob": ("POST", "/v1/jobs/{job_id}/cancel", job),
            "RetryJob": ("POST", "/v1/jobs/{job_id}/retry", job)}


# A bulk action changes at most operator.BULK_LIMIT jobs in one transaction.
_TOO_MANY: dict[int | str, dict[str, Any]] = {
    409: {"description": "the filter matches more jobs than one action may change"}}


def family_routers() -> list[APIRouter]:
    """`router` of every module in api_stub/routes/ (a family's endpoints)."""
    import api_stub.routes as pkg

    found = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"api_stub.routes.{info.name}")
        found.append(module.router)
    return found


def family_metrics() -> None:
    """Import every `tasks.<family>.metrics` module: each adds its gauges to /metrics."""
    import tasks as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.ispkg and importlib.util.find_spec(f"tasks.{info.name}.metrics") is not None:
            importlib.import_module(f"tasks.{info.name}.metrics")


def job_type_catalogue() -> list[JobTypeOut]:
    """The job types as `GET /v1/job-types` and `warden job-types` show them."""
    default_attempts = get_settings().max_attempts
    out = []
    for name, task in job_types().items():
        doc = (task.__doc__ or task.run.__doc__ or "").strip()
        out.append(JobTypeOut(
            name=name, description=doc.split("\n\n")[0],
            scope=task.required_scope(), admin_when=task.admin_when or None,
            singleton=bool(task.singleton),
            max_attempts=task.max_attempts or default_attempts,
            params_schema=task.params.model_json_schema(),
        ))
    return out


def _authorize(who: Principal, job_type: str, params: Any) -> None:
    """403 naming the scope and the type when `who` may not submit this job."""
    try:
        scopes.check(who, job_type, params)
    except scopes.ScopeRequired as exc:
        raise HTTPException(403, str(exc)) from exc


def job_out(row: Any, *, consumers: why.Consumers = why.LOOK_UP) -> JobOut:
    """One job in full: its children by status, and what it waits on (`consumers`: the
    queue's consumers, looked up once by a caller that shows many jobs)."""
    out = JobOut.from_row(row)
    if out.children_total:
        out.children = jobstore.children_summary(out.id)
    task = job_types().get(out.type)
    out.waiting_on = why.explain(row, singleton=bool(getattr(task, "singleton", False)),
                                 consumers=consumers)
    return out


def _bulk(action: operator.Action, body: BulkIn, who: Principal) -> Any:
    flt = operator.JobFilter(status=body.status, type=body.type,
                             created_after=body.created_after,
                             created_before=body.created_before)
    try:
        return operator.bulk(action, flt, actor=who.name, reason=body.reason,
                             dry_run=body.dry_run)
    except operator.FilterError as exc:
        # The body's model admits only the statuses the action touches, so what is left is
        # the state: more jobs match than one action may change.
        raise HTTPException(409, str(exc)) from exc


def _operate(op: Callable[[uuid.UUID], Any], job_id: uuid.UUID) -> Any:
    try:
        return op(job_id)
    except jobstore.JobNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except jobstore.JobStateConflict as exc:
        raise HTTPException(409, str(exc)) from exc


def _probe_db() -> None:
    with session_scope() as s:
        s.execute(text("SET LOCAL statement_timeout = 2000"))
        s.execute(text("SELECT 1"))


def _probe_redis() -> None:
    get_redis().ping()
