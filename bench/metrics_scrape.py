"""metrics_scrape: one /metrics scrape of the real API at 10,000,000 job rows over at ~10,000.

The job table is seeded set-based as bench/job_table.py seeds it (a month of finished jobs
with the unfinished ones of a busy platform, scaled), the statistics summary holds a month
of outcomes for ten types, and the API runs with WARDEN_METRICS_CACHE_SECONDS=0 so that
every scrape reads Postgres and Redis (the production cache of 5 s would hide the cost).
The figure is the median wall time of a full HTTP scrape from this process, in a steady
state: the events of the seeded history are dropped, not folded (see run()).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import httpx

from bench import job_table
from bench.services import Services, new_port, start_http

SCRAPES = 25
WARMUP = 3


def _seed_stats(svc: Services) -> None:
    """A month of events for the seeded types, folded once: the summary's real size."""
    svc.sql(
        "INSERT INTO job_events (type, status, error_code, run_seconds, wait_seconds, attempts) "
        "SELECT (ARRAY" + str(list(job_table.TYPES)) + ")[1 + g % 10], "
        "(ARRAY['succeeded','succeeded','succeeded','failed','retrying'])[1 + g % 5], "
        "CASE WHEN g % 5 = 3 THEN 'job_error' END, random() * 30, random() * 5, 1 + g % 3 "
        "FROM generate_series(1, 50000) g")
    from workers import stats

    stats.fold_all()


def _scrape_times(url: str) -> list[float]:
    times = []
    with httpx.Client(timeout=60) as client:
        for i in range(WARMUP + SCRAPES):
            start = time.perf_counter()
            r = client.get(f"{url}/metrics")
            elapsed = time.perf_counter() - start
            r.raise_for_status()
            assert "warden_jobs{" in r.text and "warden_schedule_last_success" in r.text
            if i >= WARMUP:
                times.append(elapsed)
    return times


def _rows(svc: Services) -> int:
    import psycopg

    with psycopg.connect(svc.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM job_runs").fetchone()
    return int(row[0]) if row else 0


def run(svc: Services, big_rows: int = 10_000_000) -> Iterator[str]:
    small_rows = job_table.unfinished_total(0.001) + 10_000
    port = new_port()
    start_http(svc, ["-m", "cli.main", "api", "--port", str(port)], "api-metrics", port,
               WARDEN_METRICS_CACHE_SECONDS="0")
    url = f"http://127.0.0.1:{port}"
    _seed_stats(svc)
    medians = {}
    for label, rows in (("small", small_rows), ("big", big_rows)):
        svc.sql("TRUNCATE job_runs")
        job_table.seed(svc.database_url, rows)
        # The seeded history is inserted already finished, and the insert trigger makes an
        # event of each row: ~10M pending events, which no running platform has (the relay
        # folds them every pass). A scrape folds at most a bounded batch (workers/metrics.py)
        # and would measure that instead; the summary already holds a month (_seed_stats).
        svc.sql("TRUNCATE job_events")
        n = _rows(svc)
        times = _scrape_times(url)
        medians[label] = (n, statistics.median(times), max(times))
    (n_small, small, _), (n_big, big, worst) = medians["small"], medians["big"]
    svc.sql("TRUNCATE job_runs")
    yield (f"metrics_scrape ratio={big / small:.2f} (median /metrics scrape at {n_big:,} job "
           f"rows over at {n_small:,}; goal 2 or less) {big * 1000:.0f} ms vs "
           f"{small * 1000:.0f} ms, slowest of {SCRAPES} at {n_big:,}: {worst * 1000:.0f} ms "
           "(goal under 250 ms)")
