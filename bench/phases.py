"""Where a ping job's time goes: JobTask's steps timed one by one, in this process.

Why in-process and serial: a worker's pool child runs these same calls one after another,
so the median wall time of each step (on an otherwise idle machine) says which of the
claim (owner, lease, epoch in one UPDATE) and the fenced outcome write costs the drain rate
its jobs/s. The reference
lines (an empty transaction, a Redis PING) show how much of it is round trips.
"""

from __future__ import annotations

import io
import logging
import statistics
import time
from collections.abc import Callable

from bench.services import Services

JOBS = 300


class _Timer:
    """`with timer("step"):` appends the block's wall time to that step's samples."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}
        self._name, self._t0 = "", 0.0

    def __call__(self, name: str) -> _Timer:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self.samples.setdefault(self._name, []).append(time.perf_counter() - self._t0)

    def median_ms(self, name: str) -> float:
        return 1000 * statistics.median(self.samples[name])


def _quiet_json_logging() -> Callable[[], None]:
    """Configure the worker's JSON logging into a sink; return a function that undoes it."""
    from workers import logging as wlogging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    wlogging.configure("INFO")
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(io.StringIO())

    def restore() -> None:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])

    return restore


def run(svc: Services) -> list[str]:
    """Time each step of JOBS ping jobs; returns the report lines."""
    import structlog
    from sqlalchemy import text

    from workers import identity, jobstore
    from workers.db import session_scope
    from workers.enqueue import job_types, submit
    from workers.redis_client import get_redis
    from workers.runs import Run, heartbeat

    svc.reset_queues()
    task = job_types()["platform.ping"]
    ids = [str(submit("platform.ping", {"echo": f"p{i}"}, source="bench").job["id"])
           for i in range(JOBS)]
    svc.redis().flushdb()  # no worker will take these messages; only the rows are used
    log = structlog.get_logger("warden.jobs")
    raw = {"echo": "p"}
    worker = "bench:0"
    restore = _quiet_json_logging()
    timer = _Timer()
    try:
        for jid in ids:
            with timer("claim"):
                owner = identity.new_token()
                claim = jobstore.claim(jid, "platform.ping", raw, owner, worker, 5)
            assert claim.action == "run", claim
            run = Run(jid, claim.epoch, owner, claim.attempts, claim.max_attempts)
            task.push_request(id=jid)
            task._local.run = run
            try:
                # ping's body records its outcome itself (self.complete, fenced by the epoch)
                with timer("run+complete"):
                    heartbeat.add(run)
                    task.run(task.parse_params(raw))
                    heartbeat.discard(run)
            finally:
                task._local.run = None
                task.pop_request()
            assert run.completed
            with timer("2 log lines"):
                log.info("job.started", attempt=1)
                log.info("job.succeeded", attempt=1)
            with timer("ref: empty txn"), session_scope() as s:
                s.execute(text("SELECT 1"))
            with timer("ref: redis PING"):
                get_redis().ping()
    finally:
        restore()
    steps = ["claim", "run+complete", "2 log lines"]
    total = sum(timer.median_ms(k) for k in steps)
    return [
        f"  ping steps, median ms over {JOBS} serial jobs in-process: "
        + " ".join(f"{k.replace(' ', '_')}={timer.median_ms(k):.3f}" for k in steps)
        + f" sum={total:.3f}",
        f"  reference: empty transaction (pre-ping+BEGIN+SELECT 1+COMMIT) "
        f"{timer.median_ms('ref: empty txn'):.3f} ms, Redis PING "
        f"{timer.median_ms('ref: redis PING'):.3f} ms",
    ]
