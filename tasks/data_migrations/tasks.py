"""Data-migration tasks: the runner with the job core's fenced transactions around it."""

from __future__ import annotations

from typing import Any

import structlog

from tasks.data_migrations import service
from tasks.data_migrations.schemas import MigrationReverse, MigrationRun, RetryFailed
from workers.app import app
from workers.db import session_scope
from workers.enqueue import submit
from workers.jobs import JobTask

log = structlog.get_logger("warden.data_migrations")


def _hooks(task: JobTask) -> service.Hooks:
    """The runner's transactions are the job's fenced ones: a run that lost its job
    commits no batch, nor a successor; the last one also records the job's outcome."""
    return service.Hooks(session=task.session, complete=task.complete,
                         progress=task.progress, check_owned=task.check_owned,
                         job_id=task.job_id, submit=service.successor_in)


# Every migration job steers a migration, which the /v1/migrations routes allow only to
# admin: the same scope here, or a service token could do with a job what the routes refuse.
@app.task(name="migration.run", base=JobTask, params=MigrationRun, bind=True, scope="admin")
def run(self: JobTask, params: MigrationRun) -> dict[str, Any]:
    """Run a data migration batch by batch from its checkpoint.

    Idempotency: the cursor commits in each batch's transaction, with the batch, so a rerun
    resumes after the last committed batch and never applies one twice; each transform is
    idempotent per batch besides (unique keys), for a batch retried after a timeout.
    """
    return service.run(params.name, batch_size=params.batch_size, dry_run=params.dry_run,
                       hooks=_hooks(self))


@app.task(name="migration.reverse", base=JobTask, params=MigrationReverse, bind=True,
          scope="admin")
def reverse(self: JobTask, params: MigrationReverse) -> dict[str, Any]:
    """Undo a data migration batch by batch and set it back to pending.

    Idempotency: each batch deletes only rows the migration made; a rerun deletes what is
    left and nothing else.
    """
    # `actor` is the submitting principal (workers.scopes.on_behalf_of); a job submitted
    # without one (beat, a bare `celery call`) is logged as itself, never as "api".
    return service.reverse(params.name, actor=params.actor or f"job:{self.job_id}",
                           reason=params.reason, hooks=_hooks(self))


@app.task(name="migration.retry_failed", base=JobTask, params=RetryFailed, bind=True,
          scope="admin")
def retry_failed(self: JobTask, params: RetryFailed) -> dict[str, Any]:
    """Enqueue a run for every failed migration whose attempt budget is not spent.

    Idempotency: each run's key names the migration's pass and attempt
    (`migration.retry:<name>:r<pass>:a<attempt>`), so a repeated sweep enqueues nothing new.
    """
    with session_scope() as s:
        plans = service.due_for_retry(s)
    retried = []
    for plan in plans:
        sub = submit("migration.run", plan.params, idempotency_key=plan.key,
                     source="migration")
        log.info("migration.retry_enqueued", migration=plan.name, job=str(sub.job["id"]),
                 created=sub.created)
        retried.append({"name": plan.name, "job_id": str(sub.job["id"]),
                        "created": sub.created})
    with self.session() as s:
        return self.complete(s, {"retried": retried})
