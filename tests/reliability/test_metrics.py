"""/metrics as an operator reads it: every series from the first scrape, exact counts from the
job table whichever API replica is scraped, queue and schedule figures (real processes)."""

from __future__ import annotations

import time

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from schedules import SCHEDULE
from tests.conftest import Isolated, Proc, Services, start_api, start_worker

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    body = httpx.get(f"{url}/metrics", timeout=10).text
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def submit(env: Isolated, job_type: str, params: dict[str, object], **kw: object) -> str:
    """A committed row, published by the relay (the outbox path)."""
    return env.insert_job(job_type, params, **kw)


def _wait_scrape(url: str, pred: object, timeout: float = 30) -> Samples:
    deadline = time.monotonic() + timeout
    samples = scrape(url)
    while not pred(samples) and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.5)
        samples = scrape(url)
    return samples


def test_metrics_from_first_scrape_exact_counts_across_replicas(
        iso: Isolated, services: Services) -> None:
    # Scrapes read the job table at most every 5 s per process: the test polls.
    env = dict(iso.env)
    procs: list[Proc] = []
    try:
        # given an API and no worker
        api, url = start_api(services, env=env)
        procs.append(api)
        # then before any job ran, every job type and schedule entry has its series
        first = scrape(url)
        assert value(first, "warden_job_run_seconds_count", type="platform.ping") == 0
        assert value(first, "warden_job_queue_wait_seconds_count", type="audit.integrity") == 0
        assert value(first, "warden_jobs", status="dead", type="backup.create") == 0
        for e in SCHEDULE:
            assert value(first, "warden_schedule_last_success_timestamp_seconds",
                         entry=e.name, task=e.task) == 0
            assert value(first, "warden_schedule_period_seconds",
                         entry=e.name, task=e.task) == e.period
            assert value(first, "warden_schedule_known_since_timestamp_seconds",
                         entry=e.name, task=e.task) == pytest.approx(time.time(), abs=120)
        assert value(first, "warden_queue_consumers", queue="warden") == 0

        # when a job is accepted and no worker consumes the queue
        r = httpx.post(f"{url}/v1/jobs", json={"type": "platform.ping", "params": {}},
                       headers={"Authorization": f"Bearer {_token(iso)}"}, timeout=10)
        assert r.status_code == 202, r.text
        # then the broker holds its message and the queue's oldest job ages
        waiting = _wait_scrape(url, lambda s: value(s, "warden_queue_messages",
                                                    queue="warden") == 1
                               and value(s, "warden_queue_oldest_age_seconds",
                                         queue="warden") > 1)
        assert value(waiting, "warden_queue_messages", queue="warden") == 1
        assert value(waiting, "warden_jobs", status="queued", type="platform.ping") == 1

        # when a worker runs it, 3 more pings, one job that dies after 3 attempts, and one
        # schedule slot
        procs.append(start_worker(services, "metrics", env=env))
        for _ in range(3):
            submit(iso, "platform.ping", {})
        dead = submit(iso, "testing.flaky", {}, max_attempts=3)
        beat = submit(iso, "platform.ping", {"echo": "beat"}, source="beat",
                      idempotency_key="platform-heartbeat:2026-12-04T12:00")
        iso.wait(dead, {"dead"}, timeout=60)
        iso.wait(beat, {"succeeded"}, timeout=60)
        deadline = time.monotonic() + 30
        while iso.count("SELECT count(*) FROM job_runs WHERE status <> 'succeeded' "
                        "AND type = 'platform.ping'") and time.monotonic() < deadline:
            time.sleep(0.2)

        # then the counts are exact, and the same on a second API replica
        # (the broker's figures are cached apart from the jobs', for up to
        # WARDEN_METRICS_CACHE_SECONDS: the consumer count may lag the outcomes that long)
        def done(s: Samples) -> bool:
            return value(s, "warden_job_outcomes_total", type="platform.ping",
                         status="succeeded", error_code="") == 5 and value(
                s, "warden_job_outcomes_total", type="testing.flaky", status="dead",
                error_code="transient:TransientError") == 1 and value(
                s, "warden_queue_consumers", queue="warden") == 1

        samples = _wait_scrape(url, done)
        assert done(samples), {k: v for k, v in samples.items() if "outcomes" in k[0]}
        assert value(samples, "warden_job_run_seconds_count", type="platform.ping") == 5
        assert value(samples, "warden_job_queue_wait_seconds_count", type="platform.ping") == 5
        assert value(samples, "warden_job_attempts_bucket", type="platform.ping", le="1.0") == 5
        assert value(samples, "warden_job_outcomes_total", type="testing.flaky",
                     status="retrying", error_code="transient:TransientError") == 2
        assert value(samples, "warden_job_run_seconds_count", type="testing.flaky") == 3
        assert value(samples, "warden_job_attempts_bucket", type="testing.flaky", le="2.0") == 0
        assert value(samples, "warden_job_attempts_bucket", type="testing.flaky", le="3.0") == 1
        assert value(samples, "warden_jobs", status="dead", type="testing.flaky") == 1
        assert value(samples, "warden_jobs", status="queued", type="platform.ping") == 0
        last = value(samples, "warden_schedule_last_success_timestamp_seconds",
                     entry="platform-heartbeat", task="platform.ping")
        assert last == pytest.approx(time.time(), abs=60)
        assert value(samples, "warden_queue_consumers", queue="warden") == 1

        api2, url2 = start_api(services, env=env)
        procs.append(api2)
        other = scrape(url2)
        for key, v in samples.items():
            if key[0].startswith(("warden_job_", "warden_schedule_last")) and \
                    not key[0].startswith("warden_job_events"):
                assert other[key] == v, key
    finally:
        for p in procs:
            p.stop()


def _token(iso: Isolated) -> str:
    """An admin token in the isolated database, made the way `warden token create` does."""
    import hashlib
    import secrets

    token = "wdn_" + secrets.token_urlsafe(32)
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO api_tokens (name, token_hash, scopes) VALUES (%s, %s, %s)",
                     (f"metrics-{secrets.token_hex(3)}",
                      hashlib.sha256(token.encode()).hexdigest(), ["admin"]))
    return token
