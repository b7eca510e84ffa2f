"""Never lose an accepted job: accepted while Redis is down, run once it is back."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Services, start_api, start_worker, wait_for_status
from workers import jobstore
from workers.embedded import EmbeddedRedis

pytestmark = pytest.mark.slow


def test_job_accepted_while_redis_is_down_runs_after_restart(
    services: Services, tokens: dict[str, str], tmp_path: Path
) -> None:
    # given an API and a worker on a Redis of their own, and that Redis stopped
    rd = EmbeddedRedis(tmp_path)
    redis_url = rd.start()
    api, base = start_api(services, redis_url=redis_url)
    worker = start_worker(services, "outage", redis_url=redis_url)
    auth = {"Authorization": f"Bearer {tokens['enqueue']}"}
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
        row = jobstore.get(job_id)
        assert row is not None
        assert (row["status"], row["published_at"]) == ("queued", None)
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"]["ok"] is False
        # when Redis comes back on the same port, with no manual step
        port = rd.port
        rd.start()
        assert rd.port == port
        # then the relay publishes the job and the worker runs it
        done = wait_for_status(job_id, {"succeeded"}, timeout=90)
        assert done["result"]["echo"] == "outage"  # type: ignore[index]
        assert done["attempts"] == 1
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    finally:
        worker.stop()
        api.stop()
        rd.stop()
