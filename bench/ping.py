"""ping_overhead: how fast one worker drains platform.ping jobs vs bare Celery no-ops.

Both kinds are queued in full before the worker starts, so the figure is the worker's
drain rate, not the producer's. The rate is taken from the worker's own log: Celery logs
"Task <name>[<id>] succeeded" with a timestamp for every task of either kind, so no probe
(and no extra round trip in the no-op) is needed to see when each one finished.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bench.services import Services, start_worker

SUCCEEDED = re.compile(r"^Task (?P<name>[\w.]+)\[[0-9a-f-]+\] succeeded in ")
WARMUP = 10  # the first completions pay for each pool child's first connections


@dataclass(frozen=True)
class Drain:
    """Completions of one drain: how many, over how long, at what rate."""

    name: str
    count: int
    seconds: float  # from the first counted completion to the last

    @property
    def rate(self) -> float:
        return (self.count - 1) / self.seconds if self.seconds > 0 else float("nan")


def completions(log: Path, task_name: str) -> list[datetime]:
    """Sorted completion times of `task_name` in a worker's JSON log."""
    times = []
    for line in log.read_text(errors="replace").splitlines():
        if '"succeeded in' not in line and "succeeded in " not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        match = SUCCEEDED.match(str(record.get("event", "")))
        if match and match["name"] == task_name:
            times.append(datetime.fromisoformat(record["timestamp"]))
    return sorted(times)


def drain(svc: Services, task_name: str, n: int, concurrency: int) -> tuple[Drain, list[datetime]]:
    """Start one worker on the full queue; wait until it logged n completions; stop it."""
    worker = start_worker(svc, concurrency)
    deadline = time.monotonic() + max(120.0, n / 10)  # a guard against a hang, not a limit
    try:
        while True:
            times = completions(worker.log, task_name)
            if len(times) >= n:
                break
            if not worker.alive():
                raise RuntimeError(f"worker died during the drain:\n{worker.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(times)}/{n} {task_name} done before the guard "
                                   f"deadline:\n{worker.tail()}")
            time.sleep(0.25)
    finally:
        worker.stop()
    skip = min(WARMUP, n // 10)
    counted = times[skip:]
    return Drain(task_name, len(counted), (counted[-1] - counted[0]).total_seconds()), times


def enqueue_noops(n: int) -> None:
    """n no-op messages shaped like ping's (a `params` kwarg), straight to the broker."""
    from bench.tasks import NOOP
    from workers.app import app

    for i in range(n):
        app.send_task(NOOP, kwargs={"params": {"echo": f"noop-{i}"}})


def enqueue_pings(n: int) -> None:
    """n pings through submit(), as production does: a job_runs row, then the message."""
    from workers.enqueue import pending_count, submit

    # Threads only to make the setup quicker; nothing here is measured.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: submit("platform.ping", {"echo": f"ping-{i}"}, source="bench"),
                      range(n)))
    # Let the publish marker finish, so its UPDATEs do not run during the drain.
    deadline = time.monotonic() + 30
    while pending_count() and time.monotonic() < deadline:
        time.sleep(0.1)


def job_status_counts() -> dict[str, int]:
    from sqlalchemy import text

    from workers.db import session_scope

    with session_scope() as s:
        rows = s.execute(text("SELECT status, count(*) FROM job_runs GROUP BY 1")).all()
    return {str(r[0]): int(r[1]) for r in rows}


def db_span_seconds() -> float:
    """Seconds between the first and last finished_at: a cross-check of the log times."""
    from sqlalchemy import text

    from workers.db import session_scope

    with session_scope() as s:
        span = s.execute(text(
            "SELECT EXTRACT(EPOCH FROM max(finished_at) - min(finished_at)) FROM job_runs"
        )).scalar_one()
    return float(span or 0.0)


def run(svc: Services, n: int, concurrency: int) -> list[str]:
    """Both drains, no-op first; returns the report lines."""
    from bench.tasks import NOOP

    svc.reset_queues()
    enqueue_noops(n)
    noop, _ = drain(svc, NOOP, n, concurrency)

    svc.reset_queues()
    enqueue_pings(n)
    ping, _ = drain(svc, "platform.ping", n, concurrency)
    statuses = job_status_counts()
    span = db_span_seconds()

    ratio = ping.rate / noop.rate
    return [
        f"ping_overhead ratio={ratio:.2f} "
        "(platform.ping jobs/s through JobTask over bare Celery no-op tasks/s)",
        f"  ping  {ping.rate:8.1f} jobs/s   noop {noop.rate:8.1f} tasks/s   "
        f"(N={n} each, one worker -c {concurrency}, first->last completion in the worker "
        f"log, first {min(WARMUP, n // 10)} excluded as warm-up)",
        f"  ping per job: {1000 * concurrency / ping.rate:.2f} ms of a pool child vs "
        f"{1000 * concurrency / noop.rate:.2f} ms for a no-op; job_runs after the drain: "
        f"{statuses}; finished_at span {span:.2f} s (log span {ping.seconds:.2f} s)",
    ]
