"""Platform tasks: the ping used by smoke tests and the benchmarks."""

from __future__ import annotations

from tasks.platform.schemas import Ping
from workers.app import app
from workers.jobs import JobTask


@app.task(name="platform.ping", base=JobTask, params=Ping, bind=True)
def ping(self: JobTask, params: Ping) -> dict[str, str]:
    """Return the echo and the job id.

    Idempotency: no effect beyond its own result, which self.complete records once,
    conditional on this run's ownership (the shape of every job with an effect).
    """
    with self.session() as session:
        return self.complete(session, {"echo": params.echo, "job_id": self.job_id})
