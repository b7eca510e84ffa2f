"""Platform tasks: the ping used by smoke tests and the benchmarks, and job retention."""

from __future__ import annotations

from typing import Any

from tasks.platform import service
from tasks.platform.schemas import Ping, PruneJobs
from workers.app import app
from workers.jobs import JobTask
from workers.settings import get_settings


@app.task(name="platform.ping", base=JobTask, params=Ping, bind=True)
def ping(self: JobTask, params: Ping) -> dict[str, str]:
    """Return the echo and the job id.

    Idempotency: no effect beyond its own result, which self.complete records once,
    conditional on this run's ownership (the shape of every job with an effect).
    """
    with self.session() as session:
        return self.complete(session, {"echo": params.echo, "job_id": self.job_id})


# admin: it deletes job history (operator maintenance; beat runs it nightly).
@app.task(name="platform.prune_jobs", base=JobTask, params=PruneJobs, bind=True,
          singleton=True, scope="admin")
def prune_jobs(self: JobTask, params: PruneJobs) -> dict[str, Any]:
    """Delete finished jobs older than their retention, one fenced batch at a time.

    Idempotency: deleting what is past its retention twice deletes nothing more; each
    batch commits only while this run owns the job, and a run that resumes starts over
    from whatever is left.
    """
    settings = get_settings()
    with self.session() as session:
        cutoffs = service.Cutoffs.at(service.database_now(session),
                                     settings.job_retention_days,
                                     settings.job_retention_failed_days)
    result = service.PruneResult(params.dry_run, cutoffs)
    for status in (*service.KEPT_SHORT, *service.KEPT_LONG):
        if params.dry_run:
            with self.session() as session:
                result.deleted[status] = service.count_prunable(session, status, cutoffs)
            continue
        done = 0
        while True:
            with self.session() as session:
                n, more = service.prune_batch(session, status, cutoffs, params.batch_size)
            done += n
            result.batches += 1
            self.progress(sum(result.deleted.values()) + done, status=status)
            if not more:
                break
        result.deleted[status] = done
    with self.session() as session:
        return self.complete(session, result.as_dict())
