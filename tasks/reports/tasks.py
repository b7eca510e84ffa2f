"""Report tasks: the health report, and the delivery of a degraded report's alert.

The alert is its own job type so its retries are the core's retries (backoff, attempt
budget, dead letter visible to operators). report.health inserts that job's row in the
same transaction as the report (an outbox row: the alert cannot be lost once the report
exists, nor queued twice, by key report.deliver_alert:<report id>), then publishes it; if
the publish fails, the relay sends it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from tasks.reports import service
from tasks.reports.schemas import DeliverAlert, Health
from workers import enqueue
from workers.app import app
from workers.errors import TransientError
from workers.jobs import JobTask
from workers.settings import get_settings

ALERT_TASK = "report.deliver_alert"
ALERT_ATTEMPTS = 8  # backoff 2, 4, ... 256 s (capped at WARDEN_RETRY_BACKOFF_MAX): ~8 min


def _queue_alert(session: Session, report_id: int) -> enqueue.Prepared:
    """The alert job's row, in the caller's transaction (published after the commit)."""
    prepared = enqueue.submit_in(session, ALERT_TASK, {"report_id": report_id},
                                 idempotency_key=f"{ALERT_TASK}:{report_id}",
                                 source="report.health")
    service.set_alert_job(session, report_id, str(prepared.row_params["id"]))
    return prepared


# An alert pages whoever receives the webhook: an operator's call (the schedule, or an
# admin), not a service token's; a report without one is any enqueue token's (alert=false).
@app.task(name="report.health", base=JobTask, params=Health, bind=True,
          admin_when={"alert": True})
def health(self: JobTask, params: Health) -> dict[str, Any]:
    """Compute and store DOMAIN.md's health report; a degraded one queues its alert.

    Idempotency: the report row carries the job id and commits with the job's outcome and
    the alert job's row (keyed report.deliver_alert:<report id>) in one fenced transaction.
    """
    settings = get_settings()
    alert: enqueue.Prepared | None = None
    with self.session() as session:
        stored = service.create_report(session, params.period_hours, job_id=self.job_id,
                                       alert=params.alert,
                                       webhook_configured=settings.alert_webhook_url is not None)
        if stored["alert_state"] == "queued" and stored["alert_job_id"] is None:
            alert = _queue_alert(session, stored["id"])
            stored = service.get_report(session, stored["id"])
        result = self.complete(session, stored)
    if alert is not None:
        enqueue.publish_prepared(alert)
    return result


# admin: report.health queues it itself; sent on request, it pages whoever receives the
# webhook with any stored report's alert, which is an operator's call.
@app.task(name=ALERT_TASK, base=JobTask, params=DeliverAlert, bind=True,
          max_attempts=ALERT_ATTEMPTS, scope="admin")
def deliver_alert(self: JobTask, params: DeliverAlert) -> dict[str, Any]:
    """POST a degraded report's alert to WARDEN_ALERT_WEBHOOK_URL; every attempt recorded.

    Idempotency: at-least-once to the receiver (a POST cannot commit with Postgres); every
    attempt carries the same Idempotency-Key header and alert_id (warden-health-report-<id>)
    for the receiver to dedupe on. A failed attempt raises a transient error after its
    record commits, so the core retries it with backoff.
    """
    settings = get_settings()
    url = settings.alert_webhook_url
    with self.session() as session:
        payload = service.alert_payload(session, params.report_id)
        tries = service.attempts_so_far(session, params.report_id)
    if url is None:
        raise service.AlertRejected("WARDEN_ALERT_WEBHOOK_URL is not set")
    target = service.target_of(url.get_secret_value())
    outcome = service.post_alert(url.get_secret_value(), payload, settings.alert_timeout)
    final = outcome.ok or outcome.permanent or tries + 1 >= ALERT_ATTEMPTS
    with self.session() as session:
        attempt = service.record_delivery(session, params.report_id, job_id=self.job_id,
                                          target=target, outcome=outcome, final=final)
        if outcome.ok:
            return self.complete(session, {"report_id": params.report_id, "delivered": True,
                                           "attempt": attempt, "status_code":
                                           outcome.status_code,
                                           "alert_id": payload["alert_id"]})
    if outcome.permanent:
        raise service.AlertRejected(f"the webhook refused the alert: {outcome.error}")
    raise TransientError(f"alert delivery attempt {attempt} failed: {outcome.error}")
