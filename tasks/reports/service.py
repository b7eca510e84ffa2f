"""The health report of DOMAIN.md ("the hourly monitor"), stored with its history, and the
delivery of a degraded report's alert. Plain functions taking a session; no Celery.

Over a period of P hours ending now (the database's clock):
- data_integrity: the integrity findings as they stand (one counting pass per table with
  the audit's own predicates, domain.checks), penalty min(5 x findings, 50);
- xp_activity: spend requests created in the period by state, and the decisions made in it
  (decided_at in the period); approval rate = approved / decisions, penalty 10 below 80%,
  none when there was no decision;
- scene_xp_awards: scenes played in the period (date_played from the period's first day):
  finished, awarded (finished with xp_given); awaiting: every finished scene not given its
  XP, whenever played (a state, as the audit's scene_xp reports count it); penalty 10
  above 10 awaiting;
- character_stats: characters by status and their average XP (a state, not an activity).
The seed's monitor applied its period to some figures only; here every activity figure
has it, and no state does. The numbers are domain.rules.HEALTH_*.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import text
from sqlalchemy.orm import Session

from domain import checks, rules
from workers.errors import JobError

ALERT_KIND = "health_degraded"


class ReportNotFound(JobError):
    code = "report_not_found"


class AlertRejected(JobError):
    """The receiver refused the alert for good (a 4xx other than 408/429)."""

    code = "alert_rejected"


@dataclass(frozen=True)
class Score:
    """The health score and what each penalty took off."""

    value: int
    findings_penalty: int
    approval_penalty: int
    scenes_penalty: int

    @property
    def status(self) -> str:
        return "healthy" if self.value >= rules.HEALTH_HEALTHY_AT else "degraded"


def score(*, findings: int, decisions: int, approved: int, awaiting: int) -> Score:
    """DOMAIN.md's score: 100, minus min(5 x findings, 50), minus 10 when the approval
    rate is below 80% (only if there were decisions), minus 10 when more than 10 scenes
    await XP; never below 0."""
    find = min(rules.HEALTH_FINDING_PENALTY * findings, rules.HEALTH_FINDING_PENALTY_CAP)
    rate = approved / decisions if decisions else None
    approval = (rules.HEALTH_LOW_APPROVAL_PENALTY
                if rate is not None and rate < rules.HEALTH_LOW_APPROVAL_RATE else 0)
    scenes = (rules.HEALTH_SCENES_AWAITING_PENALTY
              if awaiting > rules.HEALTH_SCENES_AWAITING_LIMIT else 0)
    value = max(rules.HEALTH_SCORE_FLOOR, rules.HEALTH_FULL_SCORE - find - approval - scenes)
    return Score(value, find, approval, scenes)


def build_report(session: Session, period_hours: int) -> dict[str, Any]:
    """The report as DOMAIN.md shapes it (not stored: see create_report)."""
    now, start = session.execute(text(
        "SELECT now(), now() - make_interval(hours => :h)"), {"h": period_hours}).one()
    integrity = _integrity(session)
    activity = _xp_activity(session, start)
    scenes = _scenes(session, start)
    stats = _character_stats(session)
    result = score(findings=integrity["findings"], decisions=activity["decisions"],
                   approved=activity["approved"], awaiting=scenes["awaiting"])
    integrity["penalty"] = result.findings_penalty
    activity["penalty"] = result.approval_penalty
    scenes["penalty"] = result.scenes_penalty
    return {
        "timestamp": now.isoformat(),
        "period_hours": period_hours,
        "checks": {"data_integrity": integrity, "xp_activity": activity,
                   "scene_xp_awards": scenes, "character_stats": stats},
        "health_score": result.value,
        "status": result.status,
    }


def _integrity(session: Session) -> dict[str, Any]:
    by_check = {c: 0 for c in rules.INTEGRITY_CHECKS}
    row = session.execute(text(checks.character_counts_sql())).one()
    for rule, n in zip(checks.CHARACTER_RULES, row, strict=True):
        by_check[rule.check] += int(n or 0)
    scene = session.execute(text(checks.scene_counts_sql())).one()
    for srule, n in zip(checks.SCENE_RULES, scene, strict=True):
        if srule.level == "finding":
            by_check[checks.SCENE_CHECK] += int(n or 0)
    by_check[checks.ST_CHECK] = int(session.execute(text(checks.st_duplicates_sql()))
                                    .scalar_one() or 0)
    return {"findings": sum(by_check.values()), "by_check": by_check}


def _xp_activity(session: Session, start: datetime) -> dict[str, Any]:
    states = {s: 0 for s in rules.SPEND_STATES}
    for r in session.execute(text(
            "SELECT state, count(*) AS n FROM xp_spend_requests WHERE created_at >= :s "
            "GROUP BY state"), {"s": start}):
        states[r.state] = int(r.n)
    row = session.execute(text(
        "SELECT count(*) FILTER (WHERE state = :a) AS approved, "
        "count(*) FILTER (WHERE state = :d) AS denied FROM xp_spend_requests "
        "WHERE decided_at >= :s"), {"s": start, "a": rules.SPEND_APPROVED,
                                    "d": rules.SPEND_DENIED}).one()
    approved, denied = int(row.approved), int(row.denied)
    decisions = approved + denied
    return {"requests": states, "decisions": decisions, "approved": approved, "denied": denied,
            "approval_rate": round(approved / decisions, 4) if decisions else None}


def _scenes(session: Session, start: datetime) -> dict[str, Any]:
    row = session.execute(text(
        "SELECT count(*) FILTER (WHERE finished) AS finished, "
        "count(*) FILTER (WHERE finished AND xp_given) AS awarded "
        "FROM scenes WHERE date_played >= CAST(:s AS date)"), {"s": start}).one()
    return {"finished": int(row.finished), "awarded": int(row.awarded),
            "awaiting": awaiting_xp(session)}


def awaiting_xp(session: Session) -> int:
    """Scenes awaiting XP: a state, like DOMAIN.md's "more than 10 scenes await XP", counted
    by the audit's own query (check 8's report rows, domain.checks), so the health page and
    `warden audit --check scene_xp` give the same number. It used to count only scenes
    played in the period: 0 on the health page while the audit listed 251 (drill D5)."""
    counts = session.execute(text(checks.scene_counts_sql())).mappings().one()
    return sum(int(counts[r.key] or 0) for r in checks.SCENE_RULES if r.level == "report")


def _character_stats(session: Session) -> dict[str, Any]:
    rows = session.execute(text(
        "SELECT status, count(*) AS n, sum(xp) AS xp FROM characters GROUP BY status "
        "ORDER BY status")).all()
    total = sum(int(r.n) for r in rows)
    xp = sum(int(r.xp or 0) for r in rows)
    by_status = {s: 0 for s in rules.STATUSES}
    for r in rows:
        by_status[r.status] = int(r.n)  # unknown codes show up under their own name
    return {"total": total, "by_status": by_status,
            "average_xp": round(xp / total, 2) if total else 0.0}


# -- stored reports ---------------------------------------------------------------------------

def create_report(session: Session, period_hours: int, *, job_id: str | None,
                  alert: bool, webhook_configured: bool) -> dict[str, Any]:
    """Build and store a report (once per job: a second run of the job returns the first
    report). alert_state says whether the caller must queue an alert (`queued`)."""
    if job_id is not None:
        found = session.execute(text("SELECT id FROM health_reports WHERE job_id = :j"),
                                {"j": job_id}).scalar_one_or_none()
        if found is not None:
            return get_report(session, int(found))
    report = build_report(session, period_hours)
    state = "none"
    if report["status"] == "degraded":
        state = ("not_requested" if not alert else "queued" if webhook_configured
                 else "no_webhook")
    report_id = session.execute(text(
        "INSERT INTO health_reports (job_id, created_at, period_hours, health_score, status, "
        "report, alert_state) VALUES (:j, now(), :p, :sc, :st, CAST(:r AS jsonb), :a) "
        "RETURNING id"),
        {"j": job_id, "p": period_hours, "sc": report["health_score"], "st": report["status"],
         "r": json.dumps(report), "a": state}).scalar_one()
    return get_report(session, int(report_id))


def set_alert_job(session: Session, report_id: int, job_id: str) -> None:
    session.execute(text("UPDATE health_reports SET alert_job_id = :j WHERE id = :id"),
                    {"j": job_id, "id": report_id})


_REPORT_COLUMNS = ("id, job_id, created_at, period_hours, health_score, status, report, "
                   "alert_state, alert_job_id")


def _report_dict(r: Any) -> dict[str, Any]:
    out = dict(r._mapping)
    for k in ("job_id", "alert_job_id"):
        out[k] = str(out[k]) if out[k] is not None else None
    return out


def get_report(session: Session, report_id: int) -> dict[str, Any]:
    r = session.execute(text(f"SELECT {_REPORT_COLUMNS} FROM health_reports WHERE id = :id"),
                        {"id": report_id}).first()
    if r is None:
        raise ReportNotFound(f"no health report {report_id}")
    return _report_dict(r)


def history(session: Session, *, limit: int = 24,
            before_id: int | None = None) -> list[dict[str, Any]]:
    """Newest first; `before_id` pages back."""
    rows = session.execute(text(
        f"SELECT {_REPORT_COLUMNS} FROM health_reports "
        "WHERE (CAST(:b AS bigint) IS NULL OR id < :b) ORDER BY id DESC LIMIT :n"),
        {"b": before_id, "n": limit}).all()
    return [_report_dict(r) for r in rows]


def deliveries(session: Session, report_id: int) -> list[dict[str, Any]]:
    rows = session.execute(text(
        "SELECT id, job_id, attempt, at, target, ok, status_code, error, duration_ms "
        "FROM health_alert_deliveries WHERE report_id = :r ORDER BY id"),
        {"r": report_id}).all()
    return [{**dict(r._mapping), "job_id": str(r.job_id) if r.job_id else None} for r in rows]


# -- alert delivery ---------------------------------------------------------------------------

def alert_id(report_id: int) -> str:
    """The key the receiver dedupes on: the same for every attempt of one report's alert."""
    return f"warden-health-report-{report_id}"


def alert_payload(session: Session, report_id: int) -> dict[str, Any]:
    stored = get_report(session, report_id)
    return {"alert_id": alert_id(report_id), "kind": ALERT_KIND, "report_id": report_id,
            "health_score": stored["health_score"], "status": stored["status"],
            "report": stored["report"]}


@dataclass(frozen=True)
class Delivery:
    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: int
    permanent: bool = False  # the receiver refused it: retrying will not help


def post_alert(url: str, payload: dict[str, Any], timeout: float) -> Delivery:
    """One POST (no transaction is open while it waits). 2xx is delivered; 408, 429 and
    5xx and network errors are worth another try; any other 4xx is a refusal."""
    started = time.monotonic()
    try:
        response = httpx.post(url, json=payload, timeout=timeout,
                              headers={"Idempotency-Key": payload["alert_id"],
                                       "User-Agent": "warden-health-alert"})
    except httpx.HTTPError as exc:
        return Delivery(False, None, f"{type(exc).__name__}: {exc}"[:500], _ms(started))
    code = response.status_code
    if 200 <= code < 300:
        return Delivery(True, code, None, _ms(started))
    permanent = 400 <= code < 500 and code not in (408, 429)
    return Delivery(False, code, f"HTTP {code}: {response.text[:200]}", _ms(started), permanent)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def target_of(url: str) -> str:
    """Host and port only: the URL's path or query may hold a token."""
    parts = urlsplit(url)
    return (parts.hostname or "?") + (f":{parts.port}" if parts.port else "")


def record_delivery(session: Session, report_id: int, *, job_id: str | None, target: str,
                    outcome: Delivery, final: bool) -> int:
    """Store one attempt (its own transaction: a failed attempt must stay recorded while
    the job retries); returns the attempt number. `final`: no retry follows a failure."""
    attempt = int(session.execute(text(
        "SELECT count(*) + 1 FROM health_alert_deliveries WHERE report_id = :r"),
        {"r": report_id}).scalar_one())
    session.execute(text(
        "INSERT INTO health_alert_deliveries (report_id, job_id, attempt, target, ok, "
        "status_code, error, duration_ms) VALUES (:r, :j, :a, :t, :ok, :c, :e, :d)"),
        {"r": report_id, "j": job_id, "a": attempt, "t": target, "ok": outcome.ok,
         "c": outcome.status_code, "e": outcome.error, "d": outcome.duration_ms})
    state = "delivered" if outcome.ok else "failed" if final else None
    if state:
        session.execute(text("UPDATE health_reports SET alert_state = :s WHERE id = :r"),
                        {"s": state, "r": report_id})
    return attempt


def attempts_so_far(session: Session, report_id: int) -> int:
    return int(session.execute(text(
        "SELECT count(*) FROM health_alert_deliveries WHERE report_id = :r"),
        {"r": report_id}).scalar_one())
