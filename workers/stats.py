"""Job statistics: fold the job_events a trigger appends into job_stats, and read them back.

Why a fold and not counters in each process: the figures must be the same whichever API
replica is scraped, however many workers produced them, and must survive restarts and the
retention prune. The trigger (migration 0006) appends one row per status change in the
transaction that made it; `fold` moves a batch of them into job_stats and deletes them in
one transaction (SKIP LOCKED: two folds never count an event twice). Two folds may update
the same job_stats rows; each locks them in (kind, type, label) order, so one waits for the
other and they never deadlock. The relay folds on every pass (up to FOLD_BATCH); /metrics
folds a small batch before it reads (SCRAPE_FOLD_BATCH, under a statement timeout, and a
scrape whose fold fails still answers), so the summary is seconds behind at most.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from workers.db import session_scope

# Histogram bounds (seconds, or attempts), chosen for this platform's jobs: a ping takes
# milliseconds, a nightly backup or audit minutes, the hard time limit is an hour.
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900,
               1800, 3600)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)
ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 10, 20)
HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "run": RUN_BUCKETS, "wait": WAIT_BUCKETS, "attempts": ATTEMPT_BUCKETS,
}
FOLD_BATCH = 50_000
# What a /metrics scrape folds itself, at most, and for how long it may wait: ~0.3 s on the
# 2-core machine. A backlog (no relay ran for a while) is the relay's to fold, 50,000 events
# a pass; a scrape must answer well inside Prometheus' scrape timeout however large it is.
SCRAPE_FOLD_BATCH = 10_000
SCRAPE_FOLD_TIMEOUT_MS = 2_000


def le_label(bound: float) -> str:
    """A bucket bound as Prometheus writes it (`0.5`, `1.0`, `+Inf`)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _bounds() -> dict[str, list[Any]]:
    metrics, values, labels = [], [], []
    for metric, bounds in HISTOGRAMS.items():
        for b in (*bounds, math.inf):
            metrics.append(metric)
            values.append(float(b))
            labels.append(le_label(b))
    return {"bm": metrics, "bv": values, "bl": labels}


_FOLD = text("""
WITH ev AS (
    DELETE FROM job_events WHERE id IN (
        SELECT id FROM job_events ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED)
    RETURNING at, type, status, error_code, run_seconds, wait_seconds, attempts, entry
), obs AS (
    SELECT type, 'run' AS metric, run_seconds AS v FROM ev WHERE run_seconds IS NOT NULL
    UNION ALL SELECT type, 'wait', wait_seconds FROM ev WHERE wait_seconds IS NOT NULL
    UNION ALL SELECT type, 'attempts', attempts FROM ev WHERE attempts IS NOT NULL
), bounds AS (
    SELECT * FROM unnest(CAST(:bm AS text[]), CAST(:bv AS float8[]), CAST(:bl AS text[]))
        AS b(metric, le, label)
), agg AS (
    SELECT 'outcome' AS kind, type, status || '|' || COALESCE(error_code, '') AS label,
           count(*)::float8 AS value
      FROM ev WHERE status <> 'running' GROUP BY 2, 3
    UNION ALL
    SELECT o.metric || '_bucket', o.type, b.label, count(*)::float8
      FROM obs o JOIN bounds b ON b.metric = o.metric AND o.v <= b.le GROUP BY 1, 2, 3
    UNION ALL
    SELECT metric || '_sum', type, '', sum(v) FROM obs GROUP BY 1, 2
    UNION ALL
    SELECT 'schedule_success', entry, '', max(EXTRACT(EPOCH FROM at))
      FROM ev WHERE entry IS NOT NULL AND entry <> '' GROUP BY 2
), ins AS (
    -- In key order: two folds lock the rows they share in the same order (one waits for
    -- the other), never each holding one the other needs (a deadlock).
    INSERT INTO job_stats (kind, type, label, value)
    SELECT kind, type, label, value FROM agg ORDER BY kind, type, label
    ON CONFLICT (kind, type, label) DO UPDATE SET value = CASE
        WHEN job_stats.kind = 'schedule_success' THEN GREATEST(job_stats.value, EXCLUDED.value)
        ELSE job_stats.value + EXCLUDED.value END
    RETURNING 1
)
SELECT count(*) FROM ev
""")


def fold(limit: int = FOLD_BATCH, timeout_ms: int | None = None) -> int:
    """Fold up to `limit` events into job_stats; returns how many were folded. With
    `timeout_ms`, the fold gives up after that long (an error; its events stay)."""
    with session_scope() as s:
        if timeout_ms is not None:
            s.execute(text("SELECT set_config('statement_timeout', :t, true)"),
                      {"t": f"{int(timeout_ms)}ms"})
        return int(s.execute(_FOLD, {"n": limit, **_bounds()}).scalar_one())


def fold_all(max_rounds: int = 20) -> int:
    """Fold until no event is left (or `max_rounds` batches); returns how many."""
    total = 0
    for _ in range(max_rounds):
        n = fold()
        total += n
        if n < FOLD_BATCH:
            break
    return total


@dataclass
class Histogram:
    """One type's cumulative histogram: bucket label -> count, and the sum."""

    buckets: dict[str, float] = field(default_factory=dict)
    total: float = 0.0

    def series(self, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
        """Every bucket in order (missing ones are 0), +Inf last: the count."""
        return [(le_label(b), self.buckets.get(le_label(b), 0.0)) for b in (*bounds, math.inf)]


@dataclass
class Snapshot:
    """job_stats as read: outcomes by (type, status, error code), histograms by metric and
    type, schedule times by entry."""

    outcomes: dict[tuple[str, str, str], float] = field(default_factory=dict)
    histograms: dict[str, dict[str, Histogram]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Histogram)))
    schedule_success: dict[str, float] = field(default_factory=dict)
    schedule_since: dict[str, float] = field(default_factory=dict)


def read() -> Snapshot:
    """The whole summary (a few rows per job type and schedule entry)."""
    snap = Snapshot()
    with session_scope() as s:
        rows = s.execute(text("SELECT kind, type, label, value FROM job_stats")).all()
    for kind, jtype, label, value in rows:
        if kind == "outcome":
            status, _, code = label.partition("|")
            snap.outcomes[(jtype, status, code)] = value
        elif kind == "schedule_success":
            snap.schedule_success[jtype] = value
        elif kind == "schedule_since":
            snap.schedule_since[jtype] = value
        elif kind.endswith("_bucket"):
            snap.histograms[kind.removesuffix("_bucket")][jtype].buckets[label] = value
        elif kind.endswith("_sum"):
            snap.histograms[kind.removesuffix("_sum")][jtype].total = value
    return snap


def note_schedules(entries: list[str]) -> None:
    """Record when each schedule entry was first seen (kept once): its staleness alert
    counts from then, so a new entry is not "stale" before it could have run."""
    if not entries:
        return
    with session_scope() as s:
        s.execute(
            text("INSERT INTO job_stats (kind, type, label, value) "
                 "SELECT 'schedule_since', e, '', EXTRACT(EPOCH FROM now()) "
                 "FROM unnest(CAST(:e AS text[])) AS e ON CONFLICT DO NOTHING"),
            {"e": entries},
        )
