"""Operators' views: Flower lists the job; beat fires through the job record, once a slot."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
import redis

from tests.conftest import Proc, Services, wait_for_status
from workers.embedded import free_port, wait_for_port

pytestmark = pytest.mark.slow


def test_flower_shows_the_job_and_requires_auth(
    services: Services, client: httpx.Client, worker: Proc
) -> None:
    # given Flower with basic auth, watching the worker's events
    port = free_port()
    flower = Proc(["flower", "--port", str(port)],
                  services.env(WARDEN_FLOWER_PASSWORD="flower-test-pw"),
                  services.data_dir / "flower.log")
    try:
        wait_for_port(port, 60, flower.popen)  # type: ignore[arg-type]
        base = f"http://127.0.0.1:{port}"
        time.sleep(2)  # Flower subscribes to events after it listens
        # when a ping runs
        job_id = client.post("/v1/jobs", json={"type": "platform.ping"}).json()["id"]
        wait_for_status(job_id, {"succeeded"})
        # then Flower's task list has it, succeeded; and without credentials it is 401
        assert httpx.get(f"{base}/api/tasks", timeout=10).status_code == 401
        tasks: dict[str, dict[str, object]] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and tasks.get(job_id, {}).get("state") != "SUCCESS":
            tasks = httpx.get(f"{base}/api/tasks", auth=("warden", "flower-test-pw"),
                              timeout=10).json()
            time.sleep(0.5)
        assert tasks[job_id]["name"] == "platform.ping"
        assert tasks[job_id]["state"] == "SUCCESS"
    finally:
        flower.stop()


def test_a_double_fired_beat_slot_runs_once(services: Services, worker: Proc) -> None:
    from schedules import SCHEDULE
    from workers.app import app
    from workers.beat import WardenScheduler, slot_key

    # given the scheduler and an entry; when the same slot fires twice (two beats, a restart)
    scheduler = WardenScheduler(app=app, lazy=True)
    entry = SCHEDULE[0]

    class _Entry:
        name = entry.name

    slots = {slot_key(entry)}
    first = scheduler.apply_async(_Entry(), advance=False)
    second = scheduler.apply_async(_Entry(), advance=False)
    slots.add(slot_key(entry))
    # then there is one job, keyed by the slot, and it runs
    assert first.job["id"] == second.job["id"]
    assert (first.created, second.created) == (True, False)
    assert first.job["idempotency_key"] in slots
    assert first.job["source"] == "beat"
    assert first.job["expires_at"] is not None
    wait_for_status(str(first.job["id"]), {"succeeded"})


def test_beat_process_loads_the_schedule_into_redbeat(services: Services) -> None:
    # given a real beat process
    beat = Proc(["beat"], services.env(), services.data_dir / f"beat-{uuid.uuid4().hex[:6]}.log")
    try:
        r = redis.Redis.from_url(services.redis_url, decode_responses=True)
        from schedules import SCHEDULE

        # then RedBeat holds every entry in Redis, due in the future
        deadline = time.monotonic() + 30
        keys: list[str] = []
        while time.monotonic() < deadline:
            keys = [k for k in r.keys("warden:redbeat:*") if not k.endswith((":lock",
                                                                            "::schedule",
                                                                            "::statics"))]
            if all(f"warden:redbeat:{e.name}" in keys for e in SCHEDULE):
                break
            time.sleep(0.3)
        assert all(f"warden:redbeat:{e.name}" in keys for e in SCHEDULE), (keys, beat.tail())
        assert beat.popen.poll() is None, beat.tail()
    finally:
        beat.stop()
