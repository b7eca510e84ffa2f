"""ping_overhead: how fast one worker drains platform.ping jobs vs bare Celery no-ops.

Both kinds are queued in full before the worker starts, so the figure is the worker's
drain rate, not the producer's. The rate is taken from the worker's own log: Celery logs
"Task <name>[<id>] succeeded" with a timestamp for every task of either kind, so no probe
(and no extra round trip in the no-op) is needed to see when each one finished.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from bench.cpu import CpuMeter, Usage
from bench.services import Services, start_worker

SUCCEEDED = re.compile(r"^Task (?P<name>[\w.]+)\[[0-9a-f-]+\] succeeded in (?P<rt>[0-9.e-]+)s")
WARMUP = 10  # the first completions pay for each pool child's first connections
POLL = 0.25


@dataclass(frozen=True)
class Drain:
    """Completions of one drain and the CPU each role spent on it."""

    name: str
    n: int
    count: int  # completions counted (n minus the warm-up)
    seconds: float  # from the first counted completion to the last
    usage: Usage  # worker ready -> all n seen done
    runtime: float  # median seconds of the task call in the pool child (Celery's own figure)

    @property
    def rate(self) -> float:
        return (self.count - 1) / self.seconds if self.seconds > 0 else float("nan")


def pooled_rate(drains: list[Drain]) -> float:
    return sum(d.count - 1 for d in drains) / sum(d.seconds for d in drains)


def pooled_usage(drains: list[Drain]) -> tuple[Usage, int]:
    """Summed CPU over several drains, and how many tasks it was spent on."""
    roles: dict[str, float] = {}
    for d in drains:
        for k, v in d.usage.roles.items():
            roles[k] = roles.get(k, 0.0) + v
    usage = Usage(roles, sum(d.usage.foreign for d in drains), sum(d.usage.wall for d in drains))
    return usage, sum(d.n for d in drains)


def completions(log: Path, task_name: str) -> tuple[list[datetime], list[float]]:
    """Sorted completion times of `task_name` in a worker's JSON log, and the runtimes
    Celery measured in the pool child (the task call alone, without the main process)."""
    times, runtimes = [], []
    for line in log.read_text(errors="replace").splitlines():
        if "succeeded in " not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        match = SUCCEEDED.match(str(record.get("event", "")))
        if match and match["name"] == task_name:
            times.append(datetime.fromisoformat(record["timestamp"]))
            runtimes.append(float(match["rt"]))
    return sorted(times), runtimes


class LogCounter:
    """Counts completion lines incrementally: the poll must not steal the worker's CPU."""

    def __init__(self, log: Path, task_name: str) -> None:
        self.log, self.needle = log, f"Task {task_name}[".encode()
        self.offset, self.count, self.rest = 0, 0, b""

    def poll(self) -> int:
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        lines = (self.rest + chunk).split(b"\n")
        self.rest = lines.pop()
        self.count += sum(1 for ln in lines if self.needle in ln and b"] succeeded in " in ln)
        return self.count


def drain(svc: Services, task_name: str, n: int, concurrency: int) -> Drain:
    """Start one worker on the full queue; wait until it logged n completions; stop it."""
    worker = start_worker(svc, concurrency)
    deadline = time.monotonic() + max(120.0, n / 10)  # a guard against a hang, not a limit
    counter = LogCounter(worker.log, task_name)
    try:
        children = [p.pid for p in psutil.Process(worker.pid).children()]
        roles = {"worker_main": [worker.pid], "pool_children": children,
                 **{name: [pid] for name, pid in svc.server_pids.items()},
                 "bench": [os.getpid()]}
        meter = CpuMeter(roles, flat=frozenset({"worker_main", "bench"}))
        while counter.poll() < n:
            if not worker.alive():
                raise RuntimeError(f"worker died during the drain:\n{worker.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{counter.count}/{n} {task_name} done before the guard "
                                   f"deadline:\n{worker.tail()}")
            time.sleep(POLL)
        usage = meter.stop()
    finally:
        worker.stop()
    times, runtimes = completions(worker.log, task_name)
    counted = times[min(WARMUP, n // 10):]
    return Drain(task_name, n, len(counted), (counted[-1] - counted[0]).total_seconds(), usage,
                 statistics.median(runtimes))


def enqueue_noops(n: int) -> None:
    """n no-op messages shaped like ping's (a `params` kwarg), straight to the broker."""
    from bench.tasks import NOOP
    from workers.app import app

    for i in range(n):
        app.send_task(NOOP, kwargs={"params": {"echo": f"noop-{i}"}})


def enqueue_pings(n: int) -> None:
    """n pings through submit(), as production does: a job_runs row, then the message."""
    from workers.enqueue import submit
    from workers.jobstore import pending_count

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


def run(svc: Services, n: int, concurrency: int, rounds: int) -> list[str]:
    """`rounds` pairs of drains in ABBA order (drift on a shared host cancels out)."""
    from bench.tasks import NOOP

    noops: list[Drain] = []
    pings: list[Drain] = []
    statuses: dict[str, int] = {}
    span = 0.0
    for r in range(rounds):
        for kind in (("noop", "ping") if r % 2 == 0 else ("ping", "noop")):
            svc.reset_queues()
            if kind == "noop":
                enqueue_noops(n)
                noops.append(drain(svc, NOOP, n, concurrency))
            else:
                enqueue_pings(n)
                pings.append(drain(svc, "platform.ping", n, concurrency))
                statuses, span = job_status_counts(), db_span_seconds()

    ping_rate, noop_rate = pooled_rate(pings), pooled_rate(noops)
    (ping_cpu, ping_n), (noop_cpu, noop_n) = pooled_usage(pings), pooled_usage(noops)
    cpu_ratio = noop_cpu.total_per(noop_n) / ping_cpu.total_per(ping_n)
    per_round = ", ".join(f"{p.rate / o.rate:.2f} ({p.rate:.0f}/{o.rate:.0f})"
                          for p, o in zip(pings, noops, strict=True))
    return [
        f"ping_overhead ratio={ping_rate / noop_rate:.2f} "
        "(platform.ping jobs/s through JobTask over bare Celery no-op tasks/s)",
        f"  ping {ping_rate:7.1f} jobs/s   noop {noop_rate:7.1f} tasks/s   (N={n} of each per "
        f"round, {rounds} round(s) in ABBA order, a fresh worker -c {concurrency} per drain; "
        f"rate = first->last completion in the worker log, first {min(WARMUP, n // 10)} "
        "excluded)",
        f"  per round: ratio (ping/noop per s): {per_round}",
        f"  CPU ms per ping: {ping_cpu.per(ping_n)} total={ping_cpu.total_per(ping_n):.2f}",
        f"  CPU ms per noop: {noop_cpu.per(noop_n)} total={noop_cpu.total_per(noop_n):.2f}"
        f"  (CPU-time ratio noop/ping {cpu_ratio:.2f})",
        f"  other processes on the host took {100 * ping_cpu.foreign_share:.0f}% (ping drains) "
        f"and {100 * noop_cpu.foreign_share:.0f}% (noop drains) of its CPU meanwhile"
        + ("" if svc.server_pids else " (Postgres and Redis given by URL count as other)"),
        f"  pool child, median task call (Celery's 'succeeded in'): ping "
        f"{1000 * statistics.median(d.runtime for d in pings):.2f} ms, noop "
        f"{1000 * statistics.median(d.runtime for d in noops):.2f} ms; per-child cycle "
        f"(concurrency/rate): ping {1000 * concurrency / ping_rate:.2f} ms, noop "
        f"{1000 * concurrency / noop_rate:.2f} ms",
        f"  job_runs after the last ping drain: {statuses}; its finished_at span {span:.2f} s "
        f"(log span {pings[-1].seconds:.2f} s)",
    ]
