"""Never lose an accepted job: accepted while Redis is down, run once it is back."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import Services, fresh_database, start_api, start_worker
from workers.embedded import EmbeddedRedis
from workers.tokens import hash_token

pytestmark = pytest.mark.slow


def _job(url: str, job_id: str) -> tuple[str, object, int, object]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT status, published_at, attempts, result FROM job_runs "
                           "WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return row  # type: ignore[return-value]


def test_job_accepted_while_redis_is_down_runs_after_restart(
    services: Services, tmp_path: Path
) -> None:
    # given an API and a worker on a Redis and a database of their own (no other relay can
    # reach the job), and that Redis stopped
    with fresh_database(services) as db_url:
        token = "wdn_outage-test-token"
        with psycopg.connect(db_url) as conn:
            conn.execute("INSERT INTO api_tokens (name, token_hash, scopes) "
                         "VALUES ('outage', %s, '{enqueue,read}')", (hash_token(token),))
        rd = EmbeddedRedis(tmp_path)
        env = {"WARDEN_REDIS_URL": rd.start(), "WARDEN_DATABASE_URL": db_url}
        api, base = start_api(services, env=env)
        worker = start_worker(services, "outage", env=env)
        auth = {"Authorization": f"Bearer {token}"}
        try:
            rd.stop()
            # when a job is posted during the outage
            started = time.monotonic()
            r = httpx.post(f"{base}/v1/jobs", headers=auth, timeout=30,
                           json={"type": "platform.ping", "params": {"echo": "outage"}})
            accept_seconds = time.monotonic() - started
            # then it is accepted at once and stored, not yet published
            assert r.status_code == 202, r.text
            assert accept_seconds < 10
            job_id = r.json()["id"]
            time.sleep(2)
            assert _job(db_url, job_id)[:2] == ("queued", None)
            ready = httpx.get(f"{base}/readyz", timeout=10)
            assert ready.status_code == 503
            assert ready.json()["checks"]["redis"]["ok"] is False
            # when Redis comes back on the same port, with no manual step
            port = rd.port
            rd.start()
            assert rd.port == port
            # then the relay publishes the job and the worker runs it, once
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and _job(db_url, job_id)[0] != "succeeded":
                time.sleep(0.2)
            status, published_at, attempts, result = _job(db_url, job_id)
            assert status == "succeeded", (worker.tail(), api.tail())
            assert published_at is not None
            assert attempts == 1
            assert result["echo"] == "outage"  # type: ignore[index]
            assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
        finally:
            worker.stop()
            api.stop()
            rd.stop()
