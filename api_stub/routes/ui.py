"""The operations page: `/ui` on the API, server-rendered HTML behind the API's own tokens.

Why server-rendered (Jinja2, autoescaped, no script at all): an operator needs it most while
something is broken, so it must have no build step, no client bundle and nothing to go
stale; every figure comes from the same functions the API and the CLI call (the job store,
`workers.why`, `workers.operator`, the families' services). This module owns no SQL.

Sessions (docs/adr/0010-operations-page-sessions.md). The operator pastes an API token once;
the session cookie then holds `<nonce>.<token>`, HttpOnly (no script can read it),
SameSite=Strict (a cross-site request never carries it), Path=/ui (never sent to /v1),
Secure (outside WARDEN_ENV=dev always, whatever scheme the API sees), for 8 hours. Every
request re-validates the token through the API's TokenCache, so a revoked token ends its
sessions as fast as its bearer use, on every API replica, with no session store (Redis may
be the thing that is down) and no new secret to configure or rotate. The cost: the browser
holds the token itself, as the operator's password manager already does; a signed session
id would need a server-side secret shared by every replica, or Redis.

CSRF: every form carries `csrf` = HMAC-SHA256(token, "warden-ui-csrf:" + nonce), per
session (a fresh nonce at each login); a POST without the right value is 403 before any
other check. Only the holder of the cookie's token can compute it, and a cross-site page
can neither read the form nor send the cookie. The login form, which has no session yet,
is a double submit: a random value in a SameSite=Strict cookie that the form must repeat.

Scopes: `read` to view, `admin` for every action (each needs a reason and lands in the
operator log under the token's name, exactly as over the API); a job an action submits needs
its type's scope too, by the rule `POST /v1/jobs` applies (workers.scopes).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import structlog
from celery.schedules import crontab
from fastapi import APIRouter, Depends, Form, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined

from api_stub.app import job_out
from api_stub.schemas import JobOut
from domain import rules
from schedules import SCHEDULE
from tasks.audits import service as audits
from tasks.backups import service as backups
from tasks.backups.schemas import human_size
from tasks.data_migrations import service as migrations
from tasks.reports import service as reports
from workers import jobstore, liveness, operator, oplog, scopes, stats, why
from workers.celery_app import QUEUE
from workers.db import session_scope
from workers.enqueue import job_types, publisher
from workers.models import JOB_STATUSES
from workers.settings import get_settings
from workers.tokens import Principal, TokenCache

log = structlog.get_logger("warden.ui")

COOKIE = "warden_ui"
LOGIN_COOKIE = "warden_ui_login"
FLASH_COOKIE = "warden_ui_flash"
PATH = "/ui"
SESSION_SECONDS = 8 * 3600  # one shift; then the token is pasted again
PAGE = 25  # jobs per page: each queued job's waiting reason costs a few queries
REASON_MAX = 1000  # == api_stub.schemas.ReasonIn.reason max_length
# An audit run's totals per check, in reading order (a fix run adds its outcomes).
AUDIT_COLUMNS = ("findings", "reports", "fixed", "resolved_meanwhile", "blocked", "gone",
                 "unfixable")
HEALTH_POINTS = 48  # two days of hourly reports in the chart by default
# No script, no inline style, no framing: the page is plain HTML and one stylesheet.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
STATUS_CLASS = {
    "succeeded": "ok", "healthy": "ok", "passed": "ok", "done": "ok",
    "queued": "info", "pending": "info", "waiting": "info",
    "running": "run", "retrying": "warn", "paused": "warn", "degraded": "warn",
    "reversing": "warn", "throttled": "warn",
    "failed": "bad", "dead": "bad", "cancelled": "muted", "pruned": "muted",
}


# -- errors as pages -------------------------------------------------------------------------

class _Redirect(Exception):
    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UIRoute(APIRoute):
    """Turns the page's own refusals (login needed, 403, 404) into redirects and HTML pages,
    and puts the security headers on every answer. A route class, because the app's
    exception handlers are app.py's, and the UI should not need an edit there."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            try:
                response = await handler(request)
            except _Redirect as r:
                response = RedirectResponse(r.location, status_code=303)
            except _Refused as r:
                # A logged-in operator keeps the navigation (and is not offered "Log in"):
                # the 404 page had neither (drill D12).
                response = _render(request, "error.html", _quiet_viewer(request),
                                   http_status=r.status, title=f"{r.status}",
                                   message=r.message)
            for name, value in (("Content-Security-Policy", CSP),
                                ("X-Content-Type-Options", "nosniff"),
                                ("Referrer-Policy", "no-referrer"),
                                ("X-Frame-Options", "DENY")):
                response.headers.setdefault(name, value)
            if response.media_type != "text/css":
                response.headers.setdefault("Cache-Control", "no-store")
            return response

        return guarded


router = APIRouter(prefix=PATH, include_in_schema=False, route_class=UIRoute)


# -- templates -------------------------------------------------------------------------------

def _now() -> datetime:
    return datetime.now(UTC)


def fmt_duration(seconds: float | None) -> str:
    """12 s, 4 min, 3.5 h, 2.0 d: what an operator reads at a glance."""
    if seconds is None:
        return "-"
    s = abs(float(seconds))
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 90:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 90 * 60:
        return f"{s / 60:.0f} min"
    if s < 36 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def fmt_ago(when: datetime | float | None) -> str:
    """'3 min ago' / 'in 5 min' against this server's clock."""
    if when is None:
        return "-"
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(float(when), UTC)
    delta = (_now() - when).total_seconds()
    return f"{fmt_duration(delta)} ago" if delta >= 0 else f"in {fmt_duration(-delta)}"


def fmt_time(when: datetime | float | None) -> str:
    """UTC, to the second: the same clock in every operator's browser."""
    if when is None:
        return "-"
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(float(when), UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pretty(value: Any) -> str:
    """JSON for a <pre>; a plain str, so autoescape escapes it like any other text."""
    return json.dumps(value, indent=2, default=str, ensure_ascii=False, sort_keys=True)


def status_class(status: Any) -> str:
    return STATUS_CLASS.get(str(status), "muted")


_env = Environment(loader=PackageLoader("api_stub", "templates"), autoescape=True,
                   undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_env.filters.update(duration=fmt_duration, ago=fmt_ago, time=fmt_time, bytes=human_size,
                    pretty=pretty, badge=status_class)


# -- sessions --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Viewer:
    """A logged-in operator: the token's principal and this session's CSRF value."""

    principal: Principal
    csrf: str

    @property
    def admin(self) -> bool:
        return self.principal.allows("admin")


def csrf_value(token: str, nonce: str) -> str:
    """The session's CSRF value: only the holder of the token can compute it."""
    return hmac.new(token.encode(), f"warden-ui-csrf:{nonce}".encode(),
                    hashlib.sha256).hexdigest()


def _viewer(request: Request) -> Viewer | None:
    raw = request.cookies.get(COOKIE, "")
    nonce, dot, token = raw.partition(".")
    if not dot or not nonce or not token:
        return None
    cache: TokenCache = request.app.state.token_cache
    principal = cache.lookup(token)  # memory first; a query at most every cache ttl
    return Viewer(principal, csrf_value(token, nonce)) if principal is not None else None


def _quiet_viewer(request: Request) -> Viewer | None:
    """The session's viewer for an error page, or None; never an error of its own."""
    try:
        viewer = _viewer(request)
    except Exception:  # the token store unreachable: the page still answers, without nav
        return None
    return viewer if viewer is not None and viewer.principal.allows("read") else None


def _here(request: Request) -> str:
    query = request.url.query
    return request.url.path + (f"?{query}" if query else "")


def reader(request: Request) -> Viewer:
    """Dependency of every page: a session whose token may read, else the login page."""
    viewer = _viewer(request)
    if viewer is None:
        raise _Redirect(f"{PATH}/login?next={quote(_here(request), safe='')}")
    if not viewer.principal.allows("read"):
        raise _Refused(403, f"the token {viewer.principal.name!r} lacks the 'read' scope")
    return viewer


def admin(request: Request, csrf: Annotated[str, Form()] = "") -> Viewer:
    """Dependency of every action: the CSRF value first (403 without it), then a session
    whose token has the admin scope."""
    viewer = _viewer(request)
    if viewer is None or not csrf or not hmac.compare_digest(csrf, viewer.csrf):
        log.warning("ui.csrf_refused", path=request.url.path, session=viewer is not None)
        raise _Refused(403, "this form has no valid CSRF token (or the session ended): "
                            "reload the page and try again")
    if not viewer.admin:
        raise _Refused(403, f"the token {viewer.principal.name!r} lacks the 'admin' scope")
    return viewer


Reader = Annotated[Viewer, Depends(reader)]
Admin = Annotated[Viewer, Depends(admin)]


def _cookie(response: Response, request: Request, name: str, value: str,
            max_age: int) -> None:
    # Secure unless WARDEN_ENV=dev: behind a TLS proxy on another host uvicorn sees http
    # (it trusts forwarded headers from 127.0.0.1 only), and a cookie that carries the token
    # must never go out over plain http (review N17). Plain http works in dev only.
    secure = request.url.scheme == "https" or get_settings().env != "dev"
    response.set_cookie(name, value, max_age=max_age, path=PATH, httponly=True,
                        samesite="strict", secure=secure)


def _flash(response: Response, request: Request, text: str, ok: bool = True) -> Response:
    """A one-shot message for the page the redirect leads to (Post/Redirect/Get)."""
    value = base64.urlsafe_b64encode(json.dumps({"ok": ok, "text": text[:500]}).encode())
    _cookie(response, request, FLASH_COOKIE, value.decode(), 60)
    return response


def _take_flash(request: Request) -> dict[str, Any] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        found = json.loads(base64.urlsafe_b64decode(raw.encode()))
        return {"ok": bool(found["ok"]), "text": str(found["text"])}
    except (ValueError, KeyError, TypeError):
        return None


def _back(request: Request, to: str, text: str, ok: bool = True) -> Response:
    return _flash(RedirectResponse(to, status_code=303), request, text, ok)


def _render(request: Request, template: str, viewer: Viewer | None, *,
            http_status: int = 200, **context: Any) -> HTMLResponse:
    flash = _take_flash(request)
    settings = get_settings()
    html = _env.get_template(template).render(
        viewer=viewer, flash=flash, path=request.url.path, statuses=JOB_STATUSES,
        # Flower runs beside the API (`warden up`, compose): same host, its own port.
        flower=f"http://{request.url.hostname or settings.api_host}:{settings.flower_port}",
        **context)
    response = HTMLResponse(html, status_code=http_status)
    if flash is not None:
        response.delete_cookie(FLASH_COOKIE, path=PATH)
    return response


def _safe_next(target: str | None) -> str:
    """Only a path of this page: never another site (an open redirect)."""
    if target and (target == PATH or target.startswith((f"{PATH}/", f"{PATH}?"))) \
            and "\\" not in target and "//" not in target:
        return target
    return f"{PATH}/jobs"


# -- login -----------------------------------------------------------------------------------

@router.get("/static/ui.css")
def stylesheet() -> Response:
    """The one stylesheet (no auth: the login page uses it)."""
    css = resources.files("api_stub").joinpath("templates/ui.css").read_text()
    return Response(css, media_type="text/css",
                    headers={"Cache-Control": "public, max-age=300"})


@router.get("")
@router.get("/")
def home() -> Response:
    return RedirectResponse(f"{PATH}/jobs", status_code=303)


@router.get("/login")
def login_form(request: Request, next_: Annotated[str, Query(alias="next")] = "") -> Response:
    """The login form."""
    return _login_page(request, next_)


def _login_page(request: Request, next_: str, error: str | None = None) -> Response:
    """The form with a fresh double-submit value for its CSRF check (cookie and field)."""
    nonce = secrets.token_urlsafe(24)
    response = _render(request, "login.html", None,
                       http_status=200 if error is None else 401,
                       title="Log in", next=_safe_next(next_), login_csrf=nonce, error=error)
    _cookie(response, request, LOGIN_COOKIE, nonce, 3600)
    return response


@router.post("/login")
def login(request: Request, token: Annotated[str, Form()] = "",
          csrf: Annotated[str, Form()] = "",
          next_: Annotated[str, Form(alias="next")] = "") -> Response:
    """Check the pasted token as the API would; a good one starts an 8-hour session."""
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not csrf or not expected or not hmac.compare_digest(csrf, expected):
        raise _Refused(403, "the login form expired or came from elsewhere: reload it")
    token = token.strip()
    cache: TokenCache = request.app.state.token_cache
    principal = cache.lookup(token) if token else None
    if principal is None or not principal.allows("read"):
        # Never the token in a log line or on the page: only that it failed.
        log.warning("ui.login_refused", client=request.client.host if request.client else None)
        return _login_page(request, next_,
                           "That token is unknown, revoked, or lacks the read scope.")
    log.info("ui.login", actor=principal.name)
    response = RedirectResponse(_safe_next(next_), status_code=303)
    _cookie(response, request, COOKIE, f"{secrets.token_urlsafe(16)}.{token}", SESSION_SECONDS)
    response.delete_cookie(LOGIN_COOKIE, path=PATH)
    return response


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
    """End the session in this browser (the token itself stays valid: revoke it for that)."""
    viewer = _viewer(request)
    if viewer is not None and not (csrf and hmac.compare_digest(csrf, viewer.csrf)):
        raise _Refused(403, "this form has no valid CSRF token: reload the page")
    response = RedirectResponse(f"{PATH}/login", status_code=303)
    response.delete_cookie(COOKIE, path=PATH)
    return response


# -- jobs ------------------------------------------------------------------------------------

def _job_view(row: Any, consumers: why.Consumers = why.LOOK_UP) -> JobOut:
    """A job as the API shows it (its children by status, what it waits on): the API's
    own view, not a second one."""
    return job_out(row, consumers=consumers)


def _cursor(created_at: datetime, job_id: Any) -> str:
    return f"{created_at.isoformat()}|{job_id}"


def _parse_cursor(raw: str) -> tuple[datetime, uuid.UUID] | None:
    ts, _, jid = raw.partition("|")
    try:
        return datetime.fromisoformat(ts), uuid.UUID(jid)
    except ValueError:
        return None


def _uuid(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise _Refused(404, f"no job {raw!r}") from None


def _job_list(status: str, job_type: str, before: str) -> dict[str, Any]:
    errors = []
    if status and status not in JOB_STATUSES:
        errors.append(f"unknown status {status!r}")
        status = ""
    cursor = _parse_cursor(before) if before else None
    if before and cursor is None:
        errors.append("that page link is not valid; showing the first page")
    rows = jobstore.list_jobs(status=status or None, job_type=job_type[:100] or None,
                              limit=PAGE + 1, before=cursor)
    # Which workers consume the queue: asked once for the page, not once per queued row
    # (while Redis hangs that was a wait per row; review N9).
    live: why.Consumers = why.LOOK_UP
    if any(r["status"] in ("queued", "retrying") for r in rows[:PAGE]):
        live = liveness.queue_consumers(QUEUE)
    jobs = [_job_view(r, live) for r in rows[:PAGE]]
    query = {k: v for k, v in (("status", status), ("type", job_type)) if v}
    more = None
    if len(rows) > PAGE:
        more = urlencode({**query, "before": _cursor(jobs[-1].created_at, jobs[-1].id)})
    return {"jobs": jobs, "more": more, "first": urlencode(query), "status": status,
            "job_type": job_type, "types": sorted(job_types()), "errors": errors,
            "paged": bool(cursor)}


@router.get("/jobs")
def jobs_page(request: Request, viewer: Reader, status: str = "",
              job_type: Annotated[str, Query(alias="type")] = "",
              before: str = "") -> Response:
    """Jobs newest first, filtered by status and type, each with what it waits on."""
    return _render(request, "jobs.html", viewer, title="Jobs", dead=False,
                   **_job_list(status, job_type, before))


@router.get("/dead")
def dead_page(request: Request, viewer: Reader,
              job_type: Annotated[str, Query(alias="type")] = "",
              before: str = "") -> Response:
    """Dead jobs (their attempt budget spent): what an operator retries once the cause is
    fixed, one by one or all at once by filter."""
    return _render(request, "jobs.html", viewer, title="Dead jobs", dead=True,
                   **_job_list("dead", job_type, before))


@router.get("/jobs/{job_id}")
def job_page(request: Request, viewer: Reader, job_id: str) -> Response:
    """One job: params, result or error, progress, children, why it waits, and actions."""
    row = jobstore.get(_uuid(job_id))
    if row is None:
        raise _Refused(404, f"no job {job_id}")
    job = _job_view(row)
    children = (jobstore.list_jobs(parent_id=job.id, limit=101) if job.children_total
                else [])
    return _render(request, "job.html", viewer, title=f"Job {job.id}", job=job,
                   children=children[:100], more_children=len(children) > 100,
                   can_retry=job.status in operator.ALLOWED["retry"],
                   can_cancel=job.status in operator.ALLOWED["cancel"])


def _reason(raw: str) -> str | None:
    reason = raw.strip()
    return reason[:REASON_MAX] if reason else None


def _act(request: Request, viewer: Viewer, job_id: str, action: operator.Action,
         raw_reason: str) -> Response:
    jid = _uuid(job_id)
    to = f"{PATH}/jobs/{jid}"
    reason = _reason(raw_reason)
    if reason is None:
        return _back(request, to, f"A {action} needs a reason (it goes to the operator log).",
                     ok=False)
    try:
        if action == "retry":
            row = operator.retry(jid, actor=viewer.principal.name, reason=reason)
            # As the API does: the row is committed and unpublished, so if this send is
            # lost the relay sends it.
            publisher.submit(row["id"], row["type"], row["params"])
        else:
            operator.cancel(jid, actor=viewer.principal.name, reason=reason)
    except jobstore.JobNotFound as exc:
        raise _Refused(404, str(exc)) from exc
    except jobstore.JobStateConflict as exc:
        return _back(request, to, str(exc), ok=False)
    log.info(f"job.{action}_requested", job_id=str(jid), actor=viewer.principal.name,
             via="ui")
    done = "queued again" if action == "retry" else "cancelled"
    return _back(request, to, f"Job {jid} {done}; recorded in the operator log.")


@router.post("/jobs/{job_id}/retry")
def retry_job(request: Request, viewer: Admin, job_id: str,
              reason: Annotated[str, Form()] = "") -> Response:
    """Run a failed or dead job again with a fresh attempt budget."""
    return _act(request, viewer, job_id, "retry", reason)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(request: Request, viewer: Admin, job_id: str,
               reason: Annotated[str, Form()] = "") -> Response:
    """Cancel a job that has not started (queued or retrying)."""
    return _act(request, viewer, job_id, "cancel", reason)


# -- bulk actions ----------------------------------------------------------------------------

def _when(raw: str) -> datetime | None:
    """A datetime-local field, read as UTC (the page shows every time in UTC)."""
    if not raw.strip():
        return None
    found = datetime.fromisoformat(raw.strip())
    return found if found.tzinfo else found.replace(tzinfo=UTC)


@router.get("/bulk")
def bulk_form(request: Request, viewer: Reader, action: str = "retry", status: str = "",
              job_type: Annotated[str, Query(alias="type")] = "",
              created_after: str = "", created_before: str = "") -> Response:
    """Retry or cancel every job a filter matches; a dry run says how many first."""
    form = {"action": action if action in operator.ALLOWED else "retry", "status": status,
            "type": job_type, "created_after": created_after,
            "created_before": created_before, "reason": ""}
    return _render(request, "bulk.html", viewer, title="Bulk actions", form=form,
                   allowed=operator.ALLOWED, types=sorted(job_types()), result=None,
                   error=None)


@router.post("/bulk")
def bulk_action(request: Request, viewer: Admin, action: Annotated[str, Form()] = "retry",
                status: Annotated[str, Form()] = "",
                job_type: Annotated[str, Form(alias="type")] = "",
                created_after: Annotated[str, Form()] = "",
                created_before: Annotated[str, Form()] = "",
                reason: Annotated[str, Form()] = "",
                dry_run: Annotated[str, Form()] = "") -> Response:
    """Run (or count) a bulk retry or cancel; the result is shown with the form."""
    form = {"action": action, "status": status, "type": job_type,
            "created_after": created_after, "created_before": created_before,
            "reason": reason}
    result, error = None, None
    try:
        if action not in ("retry", "cancel"):
            raise ValueError(f"unknown action {action!r}")
        flt = operator.JobFilter(status=status or None, type=job_type[:100] or None,
                                 created_after=_when(created_after),
                                 created_before=_when(created_before))
        clean = _reason(reason)
        if clean is None:
            raise oplog.ReasonRequired("a reason is required (it goes to the operator log)")
        verb: operator.Action = "retry" if action == "retry" else "cancel"
        result = operator.bulk(verb, flt, actor=viewer.principal.name, reason=clean,
                               dry_run=bool(dry_run))
    except (ValueError, operator.FilterError, oplog.ReasonRequired) as exc:
        error = str(exc)
    if result is not None and not result["dry_run"]:
        log.info("job.bulk_requested", action=action, changed=result["changed"],
                 actor=viewer.principal.name, via="ui")
    return _render(request, "bulk.html", viewer, title="Bulk actions", form=form,
                   allowed=operator.ALLOWED, types=sorted(job_types()), result=result,
                   error=error, http_status=200 if error is None else 422)


# -- operator log ----------------------------------------------------------------------------

@router.get("/oplog")
def oplog_page(request: Request, viewer: Reader, before: str = "",
               action: str = "") -> Response:
    """Who did what, to how many, and why; newest first."""
    before_id = int(before) if before.isdigit() else None
    with session_scope() as s:
        rows = oplog.entries(s, limit=51, before_id=before_id, action=action[:64] or None)
    more = urlencode({"before": rows[49]["id"], **({"action": action} if action else {})}) \
        if len(rows) > 50 else None
    return _render(request, "oplog.html", viewer, title="Operator log", entries=rows[:50],
                   more=more, action=action)


# -- schedules -------------------------------------------------------------------------------

def cron_text(cron: Mapping[str, str]) -> str:
    """The entry's crontab as the five classic fields."""
    return " ".join(cron.get(k, "*") for k in ("minute", "hour", "day_of_month",
                                               "month_of_year", "day_of_week"))


def schedule_rows(now: float | None = None) -> list[dict[str, Any]]:
    """Every beat entry with its last success (job_stats: the newest succeeded beat job of
    the entry, kept through the retention prune), its next run (the crontab in the app's
    timezone) and whether it is stale (no success for two periods: the alert's rule)."""
    from workers.app import app as celery_app

    snap = stats.read()
    now = now if now is not None else _now().timestamp()
    out = []
    for e in SCHEDULE:
        spec = crontab(app=celery_app, **e.cron)
        start, delta, _ = spec.remaining_delta(spec.now())
        last = snap.schedule_success.get(e.name)
        since = snap.schedule_since.get(e.name)
        stale = now - (last or since or now) > 2 * e.period
        out.append({"entry": e, "cron": cron_text(e.cron), "last": last, "since": since,
                    "next": start + delta, "stale": stale})
    return out


@router.get("/schedules")
def schedules_page(request: Request, viewer: Reader) -> Response:
    """Beat entries: what runs when, when it last succeeded, when it runs next."""
    return _render(request, "schedules.html", viewer, title="Schedules",
                   rows=schedule_rows(), tz=get_settings().timezone)


# -- health ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chart:
    """A health-score trend as SVG coordinates (drawn by the template)."""

    width: int
    height: int
    left: int
    top: int
    plot_w: int
    plot_h: int
    points: list[dict[str, Any]]
    line: str
    grid: list[dict[str, Any]]
    labels: list[dict[str, Any]]
    threshold_y: float


def health_chart(reports_oldest_first: Sequence[Mapping[str, Any]], *, width: int = 760,
                 height: int = 240) -> Chart:
    """Scores 0-100 against time (x by report time, so gaps in the history show as gaps)."""
    left, top, right, bottom = 40, 12, 16, 34
    pw, ph = width - left - right, height - top - bottom
    times = [r["created_at"].timestamp() for r in reports_oldest_first]
    t0, t1 = (min(times), max(times)) if times else (0.0, 1.0)
    span = (t1 - t0) or 1.0

    def x(t: float) -> float:
        return round(left + (pw * (t - t0) / span if len(times) > 1 else pw / 2), 1)

    def y(score: float) -> float:
        return round(top + ph * (1 - score / 100), 1)

    points = [{"x": x(t), "y": y(r["health_score"]), "score": r["health_score"],
               "status": r["status"], "id": r["id"], "at": r["created_at"]}
              for t, r in zip(times, reports_oldest_first, strict=True)]
    grid = [{"y": y(v), "value": v} for v in (0, 25, 50, 75, 100)]
    labels = []
    if times:
        picks = sorted({0, len(times) - 1, (len(times) - 1) // 2})
        # The ends anchored inward, so their text stays inside the drawing.
        labels = [{"x": points[i]["x"],
                   "anchor": "start" if i == 0 and len(times) > 1
                   else "end" if i == len(times) - 1 and len(times) > 1 else "middle",
                   "text": reports_oldest_first[i]["created_at"].astimezone(UTC)
                   .strftime("%m-%d %H:%M")} for i in picks]
    return Chart(width, height, left, top, pw, ph, points,
                 " ".join(f"{p['x']},{p['y']}" for p in points), grid, labels,
                 y(rules.HEALTH_HEALTHY_AT))


@router.get("/health")
def health_page(request: Request, viewer: Reader, n: str = "") -> Response:
    """The health score's trend and its reports, newest first in the table."""
    limit = min(max(int(n), 2), 500) if n.isdigit() else HEALTH_POINTS
    with session_scope() as s:
        rows = reports.history(s, limit=limit)
    chart = health_chart(list(reversed(rows)))
    return _render(request, "health.html", viewer, title="Health", reports=rows,
                   chart=chart, limit=limit, healthy_at=rules.HEALTH_HEALTHY_AT)


# -- audits ----------------------------------------------------------------------------------

@router.get("/audits")
def audits_page(request: Request, viewer: Reader, before: str = "") -> Response:
    """Audit runs newest first with their totals per check."""
    before_id = int(before) if before.isdigit() else None
    with session_scope() as s:
        rows = audits.list_runs(s, limit=26, before_id=before_id)
    more = rows[24]["id"] if len(rows) > 25 else None
    return _render(request, "audits.html", viewer, title="Audits", runs=rows[:25], more=more)


@router.get("/audits/{run_id}")
def audit_page(request: Request, viewer: Reader, run_id: str, check: str = "",
               after: str = "") -> Response:
    """One audit run and a page of its findings (optionally of one check)."""
    if not run_id.isdigit():
        raise _Refused(404, f"no audit run {run_id!r}")
    if check and check not in rules.INTEGRITY_CHECKS:
        check = ""
    name, _, last = after.partition("|")
    cursor = (name, int(last)) if name and last.isdigit() else None
    with session_scope() as s:
        try:
            run = audits.get_run(s, int(run_id))
        except audits.AuditRunNotFound as exc:
            raise _Refused(404, str(exc)) from exc
        found = audits.findings(s, int(run_id), check=check or None, limit=101, after=cursor)
    more = None
    if len(found) > 100:
        more = urlencode({**({"check": check} if check else {}),
                          "after": f"{found[99]['check']}|{found[99]['id']}"})
    present = {k for t in run["totals"].values() for k in t}
    columns = [k for k in AUDIT_COLUMNS if k in present]
    return _render(request, "audit.html", viewer, title=f"Audit run {run['id']}", run=run,
                   findings=found[:100], more=more, check=check, columns=columns)


# -- data migrations -------------------------------------------------------------------------

@router.get("/migrations")
def migrations_page(request: Request, viewer: Reader) -> Response:
    """Every data migration: status, progress, rate, ETA, last error; pause and resume."""
    with session_scope() as s:
        rows = migrations.list_migrations(s)
    return _render(request, "migrations.html", viewer, title="Data migrations",
                   migrations=rows)


def _steer(request: Request, viewer: Viewer, name: str, action: str,
           reason: str | None) -> Response:
    to = f"{PATH}/migrations"
    if action == "resume":
        # The run it submits needs its job type's scope, by the rule POST /v1/jobs uses.
        try:
            scopes.check(viewer.principal, "migration.run", {"name": name})
        except scopes.ScopeRequired as exc:
            raise _Refused(403, str(exc)) from exc
    try:
        with session_scope() as s:
            if action == "pause":
                if reason is None:
                    raise oplog.ReasonRequired("a pause needs a reason (operator log)")
                migrations.pause(s, name, actor=viewer.principal.name, reason=reason)
            else:  # the state change and the run commit together (review N6)
                resumed = migrations.resume_run(s, name, actor=viewer.principal.name,
                                                reason=reason or "resumed by an operator",
                                                source="ui")
    except migrations.MigrationUnknown as exc:
        raise _Refused(404, str(exc)) from exc
    except (migrations.MigrationConflict, oplog.ReasonRequired) as exc:
        return _back(request, to, str(exc), ok=False)
    if action == "resume":
        # As POST /v1/migrations/{name}/resume: the new run starts at the checkpoint.
        resumed.publish()  # committed; if this send fails, the relay sends it
        return _back(request, to, f"{name} resumed: run {resumed.job_id} queued.")
    return _back(request, to, f"{name} pauses after its current batch.")


@router.post("/migrations/{name}/pause")
def pause_migration(request: Request, viewer: Admin, name: str,
                    reason: Annotated[str, Form()] = "") -> Response:
    """Stop after the current batch (the run's job ends; nothing is held)."""
    return _steer(request, viewer, name, "pause", _reason(reason))


@router.post("/migrations/{name}/resume")
def resume_migration(request: Request, viewer: Admin, name: str,
                     reason: Annotated[str, Form()] = "") -> Response:
    """Queue a new run that starts at the checkpoint."""
    return _steer(request, viewer, name, "resume", _reason(reason))


# -- backups ---------------------------------------------------------------------------------

@router.get("/backups")
def backups_page(request: Request, viewer: Reader, before: str = "",
                 pruned: str = "") -> Response:
    """Backups newest first: verdict, size, age, restore time against the RTO objective."""
    before_id = int(before) if before.isdigit() else None
    with session_scope() as s:
        rows = backups.list_backups(s, include_pruned=bool(pruned), limit=51,
                                    before_id=before_id)
    more = urlencode({"before": rows[49]["id"], **({"pruned": "1"} if pruned else {})}) \
        if len(rows) > 50 else None
    return _render(request, "backups.html", viewer, title="Backups", backups=rows[:50],
                   more=more, pruned=bool(pruned),
                   rto=get_settings().backup_rto_objective)



# -- anything else under /ui -----------------------------------------------------------------

# Last, so every page above matches first: an unknown /ui path is the page's own 404 (with
# the navigation when logged in), not the API's raw {"detail": "Not Found"} (drill D12).
@router.get("/{rest:path}")
def not_found(rest: str) -> Response:
    """No such page."""
    raise _Refused(404, f"no page /ui/{rest}")
