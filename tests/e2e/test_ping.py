"""A job goes in over HTTP and its result comes back: the walking skeleton."""

from __future__ import annotations

import time

import httpx

from tests.conftest import Proc, wait_for_status


def test_ping_round_trip(client: httpx.Client, worker: Proc) -> None:
    # given a running API and worker
    # when a ping is enqueued over HTTP
    started = time.monotonic()
    r = client.post("/v1/jobs", json={"type": "platform.ping", "params": {"echo": "hi"}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    # then it succeeds with the echo as its result, visible in the API
    wait_for_status(job_id, {"succeeded"}, timeout=15)
    elapsed = time.monotonic() - started
    body = client.get(f"/v1/jobs/{job_id}").json()
    assert body["status"] == "succeeded"
    assert body["result"] == {"echo": "hi", "job_id": job_id}
    assert body["attempts"] == 1
    assert body["published_at"] is not None
    assert elapsed < 5, f"ping took {elapsed:.2f}s"
    # and the worker ended it as a success (Celery's own view, which Flower shows), with no
    # ownership doubt on the way
    deadline = time.monotonic() + 10
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = [line for line in worker.tail(500_000).splitlines() if job_id in line]
        if any("succeeded in" in line for line in lines):
            break
        time.sleep(0.2)
    assert any("succeeded in" in line for line in lines), lines
    assert not any("ownership_lost" in line or "ignored" in line for line in lines), lines
