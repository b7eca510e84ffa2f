"""XP tasks: thin wrappers; the effect and the job's outcome commit in one transaction.

Deadlocks and serialization failures are not caught here: the job core treats them as
transient and retries the job, so they never end a job `failed`.
"""

from __future__ import annotations

from typing import Any

from tasks.xp import service
from tasks.xp.schemas import SceneAward, SpendDecision, WeeklyApproval, XpSpend
from workers.app import app
from workers.jobs import JobTask


@app.task(name="xp.award_scene", base=JobTask, params=SceneAward, bind=True)
def award_scene(self: JobTask, params: SceneAward) -> dict[str, Any]:
    """Give each participant named true the scene's XP.

    Idempotency: the scene's xp_given flag, set in the same transaction as the XP, its ledger
    rows and the job's outcome; a repeat fails cleanly with xp_already_given.
    """
    with self.session() as session:
        result = service.award_scene(session, params.scene_id, params.awards,
                                     job_id=self.job_id)
        return self.complete(session, result.as_dict())


@app.task(name="xp.spend", base=JobTask, params=XpSpend, bind=True)
def spend(self: JobTask, params: XpSpend) -> dict[str, Any]:
    """Pay for raising a trait by one dot and file a Pending spend request.

    Idempotency: the request, the deduction, its ledger row and the job's outcome commit
    together, once per job; a redelivered job returns its stored result.
    """
    with self.session() as session:
        result = service.spend(session, params.character_id, params.trait_name,
                               params.trait_value, job_id=self.job_id)
        return self.complete(session, result.as_dict())


@app.task(name="xp.approve_spend", base=JobTask, params=SpendDecision, bind=True)
def approve_spend(self: JobTask, params: SpendDecision) -> dict[str, Any]:
    """Approve a Pending spend request and raise its trait.

    Idempotency: the request leaves Pending in the same transaction; a repeat fails cleanly
    with already_processed.
    """
    with self.session() as session:
        result = service.approve_spend(session, params.request_id, params.decided_by,
                                       job_id=self.job_id)
        return self.complete(session, result.as_dict())


@app.task(name="xp.deny_spend", base=JobTask, params=SpendDecision, bind=True)
def deny_spend(self: JobTask, params: SpendDecision) -> dict[str, Any]:
    """Deny a Pending spend request and refund its cost.

    Idempotency: the request leaves Pending in the same transaction as the refund and its
    ledger row; a repeat fails cleanly with already_processed.
    """
    with self.session() as session:
        result = service.deny_spend(session, params.request_id, params.decided_by,
                                    job_id=self.job_id)
        return self.complete(session, result.as_dict())


@app.task(name="xp.approve_weekly", base=JobTask, params=WeeklyApproval, bind=True)
def approve_weekly(self: JobTask, params: WeeklyApproval) -> dict[str, Any]:
    """Approve a weekly XP claim: one XP per claimed category.

    Idempotency: the claim's approved flag, set in the same transaction as the XP and its
    ledger row; a repeat fails cleanly with already_processed.
    """
    with self.session() as session:
        result = service.approve_weekly(session, params.request_id, params.approved_by,
                                        job_id=self.job_id)
        return self.complete(session, result.as_dict())
