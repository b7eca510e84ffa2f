"""Fan-out in the job core: a parent waits for its children, each retried on its own, and
finishes with their totals, also when a child's worker is killed mid-chunk."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psycopg
import pytest

from tests.conftest import Proc, Services, start_worker, wait_for_status

pytestmark = pytest.mark.slow


def test_parent_totals_survive_a_killed_chunk_worker(
    services: Services, client: httpx.Client, worker: Proc, db: psycopg.Connection
) -> None:
    # given a second worker, and a parent that fans out 4 chunks of 2 s each
    extra = start_worker(services, "fan", concurrency=2)
    try:
        r = client.post("/v1/jobs", json={"type": "testing.fan_parent",
                                           "params": {"chunks": 4, "seconds": 2}})
        assert r.status_code == 202, r.text
        parent = r.json()["id"]
        # when the parent waits and a chunk's pool process is SIGKILLed mid-chunk
        wait_for_status(parent, {"waiting"}, timeout=30)
        deadline = time.monotonic() + 30
        victim = None
        while victim is None and time.monotonic() < deadline:
            victim = db.execute(
                "SELECT s.pid, s.job_id FROM test_starts s JOIN job_runs j ON j.id = s.job_id "
                "WHERE j.parent_id = %s AND j.status = 'running' LIMIT 1", (parent,)).fetchone()
            time.sleep(0.05)
        assert victim is not None
        os.kill(victim[0], signal.SIGKILL)
        # then the parent succeeds with the same totals as a run without faults
        done = wait_for_status(parent, {"succeeded", "failed", "dead"}, timeout=90)
        assert done["status"] == "succeeded", done
        assert done["result"] == {"total": 0 + 1 + 2 + 3, "statuses": ["succeeded"] * 4}
        # and each chunk's effect happened once; the killed one ran twice
        counts = db.execute(
            "SELECT j.id, j.attempts, (SELECT count(*) FROM test_effects e WHERE e.job_id = j.id) "
            "FROM job_runs j WHERE j.parent_id = %s", (parent,)).fetchall()
        assert sorted(c[2] for c in counts) == [1, 1, 1, 1]
        assert {c[0] for c in counts if c[1] == 2} == {victim[1]}
        # and the API shows the children under the parent, and lists them
        body = client.get(f"/v1/jobs/{parent}").json()
        assert (body["children_total"], body["children_pending"]) == (4, 0)
        assert body["children"] == {"succeeded": 4}
        listed = client.get("/v1/jobs", params={"parent_id": parent}).json()["items"]
        assert sorted(j["id"] for j in listed) == sorted(str(c[0]) for c in counts)
        assert all(j["parent_id"] == parent for j in listed)
    finally:
        extra.stop()


def test_a_failed_child_does_not_block_the_parent(
    client: httpx.Client, worker: Proc
) -> None:
    # given a parent whose children fail (a negative sleep raises: internal_error, final)
    r = client.post("/v1/jobs", json={"type": "testing.fan_parent",
                                       "params": {"chunks": 2, "seconds": -1}})
    parent = r.json()["id"]
    # then every child ends (failed, not retried) and the parent still finishes, saying so
    done = wait_for_status(parent, {"succeeded", "failed", "dead"}, timeout=60)
    assert done["status"] == "succeeded", done
    assert done["result"] == {"total": 0, "statuses": ["failed", "failed"]}
