"""Prometheus metrics. Job counts come from job_runs (the source of truth), so they are
right however many workers run; per-task runtimes come from Flower's /metrics."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text

from workers import jobstore
from workers.db import session_scope

REGISTRY = CollectorRegistry()

API_REQUESTS = Counter(
    "warden_api_requests_total", "HTTP requests by route and status",
    ["method", "route", "status"], registry=REGISTRY,
)
API_LATENCY = Histogram(
    "warden_api_request_seconds", "HTTP request latency by route", ["route"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
JOBS_SUBMITTED = Counter(
    "warden_jobs_submitted_total", "Jobs accepted (created) or deduplicated by key",
    ["type", "outcome"], registry=REGISTRY,
)


JOBS_BY_STATUS = (
    "SELECT status, type, count(*) AS n FROM job_runs "
    "WHERE status IN ('queued', 'running', 'retrying', 'waiting', 'dead') GROUP BY 1, 2"
)


class JobTableCollector(Collector):
    """Unfinished and dead jobs by status and type, and the outbox depth; cached a few
    seconds per process."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._cache: tuple[float, list[tuple[str, str, int]], int] | None = None
        self._lock = threading.Lock()

    def _read(self) -> tuple[list[tuple[str, str, int]], int]:
        with self._lock:
            if self._cache and self._cache[0] > time.monotonic():
                return self._cache[1], self._cache[2]
            with session_scope() as s:
                # Through the partial index over the watched statuses (migration 0002): cheap
                # however many finished jobs the table holds (docs/job-table-at-scale.md).
                rows = [
                    (r.status, r.type, int(r.n))
                    for r in s.execute(text(JOBS_BY_STATUS))
                ]
            pending = jobstore.pending_count()
            self._cache = (time.monotonic() + self.ttl, rows, pending)
            return rows, pending

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            rows, pending = self._read()
        except Exception:  # database down: /readyz says so; metrics stay scrapeable
            return
        jobs = GaugeMetricFamily("warden_jobs", "Unfinished and dead jobs in job_runs by "
                                 "status and type", labels=["status", "type"])
        for status, jtype, n in rows:
            jobs.add_metric([status, jtype], n)
        yield jobs
        yield GaugeMetricFamily("warden_outbox_pending",
                                "Accepted jobs not yet confirmed published", value=pending)


REGISTRY.register(JobTableCollector())
