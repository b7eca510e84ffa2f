"""Warden benchmarks: `make bench` (= `uv run python -m bench`).

Each result is a ratio against the thinnest baseline measured in the same run on the same
machine, so the figure says what the platform's guarantees cost, not how fast the host is:

- ping_overhead: platform.ping jobs/s through JobTask over bare Celery no-op tasks/s.
- enqueue_api: accepted POST /v1/jobs/s over a bare FastAPI route that only calls .delay().

Knobs (env): WARDEN_BENCH_N (messages per drain, 2000), WARDEN_BENCH_DURATION (seconds of
load per API phase, 10), WARDEN_BENCH_CLIENTS (16), WARDEN_BENCH_CONCURRENCY (worker pool,
2), WARDEN_BENCH_ONLY (ping|api), WARDEN_BENCH_DATABASE_URL / WARDEN_BENCH_REDIS_URL
(existing servers: a scratch database is created and dropped; the Redis DB is flushed).
"""
