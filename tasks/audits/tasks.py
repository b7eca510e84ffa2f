"""Audit tasks: the integrity audit (checks, and fixes in one transaction)."""

from __future__ import annotations

from typing import Any

from tasks.audits import service
from tasks.audits.schemas import Integrity
from workers.app import app
from workers.enqueue import Prepared, publish_prepared
from workers.jobs import JobTask
from workers.settings import get_settings


# Checking is anyone's; fixing rewrites characters, an operator's decision (the schedule's
# words): fix=true needs the admin scope.
@app.task(name="audit.integrity", base=JobTask, params=Integrity, bind=True, singleton=True,
          admin_when={"fix": True})
def integrity(self: JobTask, params: Integrity) -> dict[str, Any]:
    """Run DOMAIN.md's eight integrity checks as set-based SQL; store the run and findings.

    With fix=true every fix is applied in the same transaction, rows locked in id order and
    re-checked under the lock, each changed row recorded with its before and after values.

    Idempotency: the run, its findings, its fixes and the job's outcome commit together in
    one fenced transaction (self.complete): a redelivered job that succeeded returns its
    result, one that did not finds the data untouched and runs again (a fix re-run finds
    nothing left to fix). A fix is recorded in the operator log with its reason and who
    submitted it (`actor`, set from the principal), and the scene awards it queues commit
    with it (keys of the run) and are sent after the commit (else by the relay).
    """
    submitted: list[Prepared] = []
    with self.session() as session:
        run = service.run_audit(
            session, fix=params.fix, check_names=params.checks, job_id=self.job_id,
            lock_timeout=get_settings().audit_lock_timeout,
            progress=lambda done, total, step: self.progress(done, total, step=step),
            actor=params.actor, reason=params.reason, submitted=submitted,
        )
        result = self.complete(session, service.run_summary(run))
    for prepared in submitted:  # committed; if this send fails, the relay sends it
        publish_prepared(prepared)
    return result
