"""Prometheus metrics: one registry, right however many API, worker and beat processes run.

Every figure about jobs is read at scrape time from Postgres (job_runs' partial indexes over
the unfinished statuses, and job_stats, the summary workers/stats.py folds from the events a
trigger appends) or from Redis (queue lengths, live workers). No process counts in memory
what another process did, so every API replica exports the same values (aggregate with
max()), a restarted process loses nothing, and no worker needs a scrape port. Only the API's
own request counters are per process. Families add their figures as SqlGauge rows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import text

from workers import stats
from workers.db import session_scope
from workers.settings import get_settings

log = structlog.get_logger("warden.metrics")

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

# What the gauge counts: the unfinished jobs and the dead ones (each needs an operator),
# through ix_job_runs_unfinished. Finished jobs are counted by warden_job_outcomes_total.
WATCHED_STATUSES = ("queued", "running", "retrying", "waiting", "dead")
JOBS_BY_STATUS = text(
    "SELECT status, type, count(*) AS n FROM job_runs "
    "WHERE status IN ('queued', 'running', 'retrying', 'waiting', 'dead') GROUP BY 1, 2"
)
# Due time: when the job may start (its countdown or backoff, else its creation). Over the
# same partial index: queued and retrying rows only.
QUEUE_SQL = text(
    "SELECT count(*) FILTER (WHERE published_at IS NULL) AS outbox, "
    "EXTRACT(EPOCH FROM now() - min(due) FILTER (WHERE published_at IS NULL)) AS outbox_age, "
    "EXTRACT(EPOCH FROM now() - min(due)) AS queue_age "
    "FROM (SELECT published_at, COALESCE(next_attempt_at, not_before, created_at) AS due "
    "      FROM job_runs WHERE status IN ('queued', 'retrying')) q WHERE due <= now() "
    "   OR published_at IS NULL"
)

T = TypeVar("T")


class Cached:
    """A value read at most every WARDEN_METRICS_CACHE_SECONDS (times `factor`), shared by the
    scrape threads: several Prometheus servers (or a refreshing dashboard) cost one read."""

    def __init__(self, read: Callable[[], T], factor: float = 1.0) -> None:
        self._read, self.factor = read, factor
        self._at = -1e18
        self._value: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            ttl = get_settings().metrics_cache_seconds * self.factor
            if time.monotonic() - self._at >= ttl:
                self._value = self._read()
                self._at = time.monotonic()
            return self._value


@dataclass(frozen=True)
class SqlGauge:
    """A gauge read by one query whose rows are (label values..., value). A family declares
    its operators' figures this way (tasks/<family>/metrics.py) and the core collects them
    in one session, cached, with a database outage costing nothing but the series."""

    name: str
    help: str
    labels: tuple[str, ...]
    sql: str


_SQL_GAUGES: dict[str, SqlGauge] = {}


def add_sql_gauges(*gauges: SqlGauge) -> None:
    """Register family gauges (idempotent by name: a re-import changes nothing)."""
    for g in gauges:
        _SQL_GAUGES.setdefault(g.name, g)


def _read_sql_gauges() -> list[tuple[SqlGauge, list[tuple[Any, ...]]]]:
    out = []
    with session_scope() as s:
        for g in list(_SQL_GAUGES.values()):
            try:
                with s.begin_nested():
                    rows = [tuple(r) for r in s.execute(text(g.sql)).all()]
            except Exception as exc:  # a family's table missing: that gauge only
                log.warning("metrics.gauge_failed", gauge=g.name, error=type(exc).__name__)
                continue
            out.append((g, rows))
    return out


class SqlGaugeCollector(Collector):
    def __init__(self) -> None:
        self._data = Cached(_read_sql_gauges, factor=3.0)

    def collect(self) -> Iterator[Metric]:
        try:
            data = self._data.get()
        except Exception:  # database down: /readyz and WardenApiJobMetricsMissing say so
            return
        for g, rows in data:
            family = GaugeMetricFamily(g.name, g.help, labels=list(g.labels))
            for row in rows:
                *labels, value = row
                family.add_metric([str(v) for v in labels], float(value or 0))
            yield family


@dataclass
class JobFigures:
    """What one scrape of the job tables read."""

    jobs: list[tuple[str, str, int]]
    outbox: int
    outbox_age: float
    queue_age: float
    snapshot: stats.Snapshot
    events_pending: int


# Exact up to the cap, read through the primary key: a count(*) of a backlog of millions of
# events would cost the scrape seconds.
EVENTS_PENDING_CAP = 100_000
EVENTS_PENDING_SQL = text(
    "SELECT count(*) FROM (SELECT 1 FROM job_events LIMIT :cap) e")


def _read_jobs() -> JobFigures:
    # A small fold, bounded in size and time: the relay folds the rest. A fold that fails
    # (a statement timeout behind a backlog, a lost connection) costs this scrape nothing
    # but freshness: the summary is read as it stands.
    try:
        stats.fold(stats.SCRAPE_FOLD_BATCH, timeout_ms=stats.SCRAPE_FOLD_TIMEOUT_MS)
    except Exception as exc:
        log.warning("metrics.fold_failed", error=f"{type(exc).__name__}: {exc}"[:300])
    with session_scope() as s:
        jobs = [(r.status, r.type, int(r.n)) for r in s.execute(JOBS_BY_STATUS)]
        q = s.execute(QUEUE_SQL).one()
        pending = int(s.execute(EVENTS_PENDING_SQL,
                                {"cap": EVENTS_PENDING_CAP}).scalar_one())
    return JobFigures(jobs, int(q.outbox), float(q.outbox_age or 0.0),
                      float(q.queue_age or 0.0), stats.read(), pending)


def _read_broker() -> dict[str, Any]:
    from workers.celery_app import QUEUE
    from workers.liveness import consumers
    from workers.redis_client import broker_key, get_redis

    return {"queue": QUEUE, "messages": int(get_redis().llen(broker_key(QUEUE))),
            "consumers": len(consumers(QUEUE))}


class JobCollector(Collector):
    """Jobs by status and type, outcomes, run time, queue wait and attempts per type, the
    outbox, the queue (in job_runs and in the broker), and each schedule entry's last
    success. Every job type and every schedule entry has its series from the first scrape
    (zeros until something happens), so an alert never waits for a series to appear."""

    def __init__(self) -> None:
        self._jobs = Cached(_read_jobs)
        self._broker = Cached(_read_broker)
        self._noted: set[str] = set()

    def _note_schedules(self, names: list[str]) -> None:
        new = [n for n in names if n not in self._noted]
        if new:
            stats.note_schedules(new)
            self._noted.update(new)

    def collect(self) -> Iterator[Metric]:
        from schedules import SCHEDULE
        from workers.celery_app import job_types

        try:
            self._note_schedules([e.name for e in SCHEDULE])
            fig: JobFigures = self._jobs.get()
        except Exception as exc:  # database down: /readyz says so; metrics stay scrapeable
            log.warning("metrics.jobs_unreadable", error=f"{type(exc).__name__}: {exc}"[:300])
            fig = None  # type: ignore[assignment]
        if fig is not None:
            yield from self._job_families(fig, sorted(job_types()), SCHEDULE)
        try:
            broker = self._broker.get()
        except Exception as exc:  # Redis down: the queue series go, the rest stays
            log.warning("metrics.broker_unreadable", error=type(exc).__name__)
            return
        yield _one("warden_queue_messages", "Messages waiting in the broker's queue (Redis "
                   "list length)", "queue", broker["queue"], broker["messages"])
        yield _one("warden_queue_consumers", "Live workers consuming the queue (their "
                   "heartbeat in Redis is fresh)", "queue", broker["queue"], broker["consumers"])

    def _job_families(self, fig: JobFigures, types: list[str],
                      schedule: Sequence[Any]) -> Iterator[Metric]:
        from workers.celery_app import QUEUE

        jobs = GaugeMetricFamily("warden_jobs", "Unfinished and dead jobs in job_runs by "
                                 "status and type", labels=["status", "type"])
        seen = {(st, t): n for st, t, n in fig.jobs}
        for t in sorted(set(types) | {t for _, t, _ in fig.jobs}):
            for st in WATCHED_STATUSES:
                jobs.add_metric([st, t], seen.get((st, t), 0))
        yield jobs
        yield GaugeMetricFamily("warden_outbox_pending",
                                "Accepted jobs not yet confirmed published", value=fig.outbox)
        yield GaugeMetricFamily("warden_outbox_oldest_age_seconds",
                                "How long the oldest due, unpublished job has waited for the "
                                "relay (0: none)", value=max(0.0, fig.outbox_age))
        yield _one("warden_queue_oldest_age_seconds",
                   "How long the oldest due job in job_runs (queued or retrying) has waited to "
                   "start (0: none)", "queue", QUEUE, max(0.0, fig.queue_age))
        yield GaugeMetricFamily("warden_job_events_pending",
                                "Job events not yet folded into the statistics (counted "
                                f"up to {EVENTS_PENDING_CAP})",
                                value=fig.events_pending)

        outcomes = CounterMetricFamily(
            "warden_job_outcomes", "Ended attempts by type, outcome (succeeded, failed, dead, "
            "cancelled, retrying) and error code", labels=["type", "status", "error_code"])
        for (t, st, code), n in sorted(fig.snapshot.outcomes.items()):
            outcomes.add_metric([t, st, code], n)
        for t in types:
            if not any(k[0] == t and k[1] == "succeeded" for k in fig.snapshot.outcomes):
                outcomes.add_metric([t, "succeeded", ""], 0)
        yield outcomes

        for metric, name, help_ in (
            ("run", "warden_job_run_seconds", "Run time of each ended attempt, by type"),
            ("wait", "warden_job_queue_wait_seconds",
             "Time from when a job was due (created, countdown or backoff ended) to its start"),
            ("attempts", "warden_job_attempts", "Attempts a job took, counted when it ended"),
        ):
            family = HistogramMetricFamily(name, help_, labels=["type"])
            by_type = fig.snapshot.histograms.get(metric, {})
            for t in sorted(set(types) | set(by_type)):
                h = by_type.get(t) or stats.Histogram()
                family.add_metric([t], h.series(stats.HISTOGRAMS[metric]), h.total)
            yield family

        last = GaugeMetricFamily(
            "warden_schedule_last_success_timestamp_seconds",
            "When a job of the schedule entry last succeeded (0: never)",
            labels=["entry", "task"])
        since = GaugeMetricFamily(
            "warden_schedule_known_since_timestamp_seconds",
            "When the platform first saw the schedule entry (its staleness counts from then)",
            labels=["entry", "task"])
        period = GaugeMetricFamily(
            "warden_schedule_period_seconds",
            "The longest gap between two firings of the entry's crontab",
            labels=["entry", "task"])
        for e in schedule:
            last.add_metric([e.name, e.task], fig.snapshot.schedule_success.get(e.name, 0.0))
            since.add_metric([e.name, e.task],
                             fig.snapshot.schedule_since.get(e.name, time.time()))
            period.add_metric([e.name, e.task], e.period)
        yield from (last, since, period)


def _one(name: str, help_: str, label: str, value_label: str, value: float) -> Metric:
    family = GaugeMetricFamily(name, help_, labels=[label])
    family.add_metric([value_label], value)
    return family


REGISTRY.register(JobCollector())
REGISTRY.register(SqlGaugeCollector())
