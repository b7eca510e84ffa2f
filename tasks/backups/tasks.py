"""Backup tasks: create, verify and prune (thin wrappers over tasks.backups.service).

The nightly chain: beat submits backup.create; the create job queues backup.verify for its
backup, keyed `backup-verify:<backup id>`, in the transaction that records the backup and
the job's outcome (workers.enqueue.submit_in): the verification always names the backup it
follows, a repeated create cannot queue it twice, and no create succeeds without it. Beat
submits backup.prune later in the night, which also submits the verification of the newest
backup if none is pending and it has no verdict (a backup made outside the job system, or
adopted, or whose verification ended without a verdict: a fault, the time limit).
"""

from __future__ import annotations

from typing import Any

import structlog
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session

from tasks.backups import service
from tasks.backups.schemas import CreateBackup, PruneBackups, VerifyBackup
from workers.app import app
from workers.db import session_scope
from workers.enqueue import Prepared, publish_prepared, submit_in
from workers.errors import TransientError
from workers.jobs import JobTask

log = structlog.get_logger("warden.backups")


def verify_key(backup_id: int) -> str:
    """The idempotency key of a backup's follow-up verification."""
    return f"backup-verify:{backup_id}"


_ENDED_WITHOUT_SUCCESS = ("failed", "dead", "cancelled")


def _submit_verify(backup_id: int, source: str, retry_key: str) -> str | None:
    """Submit the verification of a backup that has no verdict and none pending. Its key is
    the backup's (`backup-verify:<id>`); if that key's job already ended without success
    (it stored no verdict: a fault, the time limit; review N13), a new one is submitted
    under `retry_key` (one per backstop run, so a repeated prune submits it once)."""
    from workers.enqueue import submit

    try:
        sub = submit("backup.verify", {"backup_id": backup_id},
                     idempotency_key=verify_key(backup_id), source=source)
        if not sub.created and sub.job["status"] in _ENDED_WITHOUT_SUCCESS:
            log.info("backup.verify_resubmitted", backup_id=backup_id,
                     previous=str(sub.job["id"]), previous_status=sub.job["status"])
            sub = submit("backup.verify", {"backup_id": backup_id},
                         idempotency_key=f"{verify_key(backup_id)}:{retry_key}"[:200],
                         source=source)
    except Exception as exc:  # the prune job's backstop submits it later
        log.warning("backup.verify_not_submitted", backup_id=backup_id, error=str(exc))
        return None
    return str(sub.job["id"])


@app.task(name="backup.create", base=JobTask, params=CreateBackup, bind=True, singleton=True,
          max_attempts=3)
def create(self: JobTask, params: CreateBackup) -> dict[str, Any]:
    """pg_dump -Fc of the application database, with a manifest, then its verification.

    Idempotency: the backup row carries the job id; a repeated run of a job whose backup
    succeeded returns that backup (no second dump), and a run that died leaves a `running`
    row the next run marks failed with its files removed. The verification is queued in the
    same transaction as the backup's row and the outcome, with the key
    `backup-verify:<backup id>` (a repeated run queues nothing twice).
    """
    queued: list[Prepared] = []

    def complete(session: Session, result: dict[str, Any]) -> dict[str, Any]:
        if params.verify:
            queued.append(submit_in(session, "backup.verify",
                                    {"backup_id": int(result["backup_id"])},
                                    idempotency_key=verify_key(int(result["backup_id"])),
                                    source="backup.create"))
        return self.complete(session, result)

    result = service.create_backup(self.job_id, session=self.session, complete=complete,
                                   check_owned=self.check_owned)
    for prepared in queued:  # committed; if this send fails, the relay sends it
        publish_prepared(prepared)
    return result


# admin: it restores into a scratch database, drops leftover scratch databases, and its
# verdict decides what retention keeps (a failed verdict gets no slot). The nightly chain
# submits it from within its jobs.
@app.task(name="backup.verify", base=JobTask, params=VerifyBackup, bind=True, singleton=True,
          max_attempts=3, scope="admin")
def verify(self: JobTask, params: VerifyBackup) -> dict[str, Any]:
    """Prove a backup restorable: checksum, TOC, restore into a scratch database, row counts
    against the manifest, integrity checks on the copy; the verdict is stored on the backup.

    Idempotency: the verdict is a pure function of the file and is written over the previous
    one, keyed by the backup id; the scratch database has a fresh name each run and is
    dropped (a leftover of a killed run is dropped by the next). Only the backup earns a
    failed verdict: the soft time limit, like a database fault, stores none and retries.
    """
    try:
        return service.verify_backup(params.backup_id, self.job_id, session=self.session,
                                     complete=self.complete, check_owned=self.check_owned)
    except SoftTimeLimitExceeded as exc:  # the clock's verdict, not the backup's
        raise TransientError(f"backup {params.backup_id}: the verification reached the soft "
                             "time limit; no verdict stored") from exc


# admin: it deletes backups, and its params can lower every limit to 0.
@app.task(name="backup.prune", base=JobTask, params=PruneBackups, bind=True, singleton=True,
          scope="admin")
def prune(self: JobTask, params: PruneBackups) -> dict[str, Any]:
    """Apply retention (7 daily, 4 weekly, 6 monthly by default), never deleting the newest
    verified backup nor one whose verification is pending.

    Idempotency: pruned rows are marked in one transaction with the job's outcome; files of
    pruned rows are deleted after it commits, and again by any later run, so a second run
    deletes nothing more.
    """
    policy = service.policy_from_settings(params.keep_daily, params.keep_weekly,
                                          params.keep_monthly)
    with self.session() as s:
        result = service.prune_backups(s, policy, dry_run=params.dry_run,
                                       actor=f"job:{self.job_id}")
        result = self.complete(s, result)
    if not params.dry_run:
        service.remove_pruned_files()
        with session_scope() as s:
            pending = service.newest_unverified(s)
        if pending is not None:
            _submit_verify(pending, "backup.prune", f"prune:{self.job_id}")
    return result
