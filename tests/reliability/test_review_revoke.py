"""Review: a job revoked from Flower (Celery's revoke) must end visibly, not loop unseen.

Flower is the operators' tool (docs/architecture.md), and its Revoke button sends Celery's
`revoke`: every worker keeps the id for 3 hours (celery.worker.state REVOKE_EXPIRES) and
acks every copy of the message without running it (Request.revoked ->
_announce_revoked). Nothing tells job_runs: the row stays `queued` (or `running`, for a
terminated run), the relay finds it "lost" (never delivered, not in the queue) and sends it
again every WARDEN_RELAY_LOST_AFTER, each copy dropped, for 3 hours; then it runs after all.
Neither cancelled, nor failed, nor visible: the operator's intent is lost both ways.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import psycopg
import pytest

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow



def test_a_job_revoked_from_flower_ends_cancelled(services: Services, iso: Isolated) -> None:
    # given a worker, and a job an operator revokes in Flower before it runs (Flower sends
    # this same control message; here the revoke comes before the row, to avoid a race)
    worker = start_worker(services, "revoke", concurrency=1, env=iso.env)
    try:
        job_id = str(uuid.uuid4())
        revoke = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.app", "control",
                                 "revoke", job_id], env=services.env(**iso.env),
                                capture_output=True, text=True, timeout=60, check=False)
        assert "flagged as revoked" in revoke.stdout, (revoke.stdout, revoke.stderr)
        with psycopg.connect(iso.database_url, autocommit=True) as conn:
            conn.execute("INSERT INTO job_runs (id, type, params) VALUES (%s, %s, %s::jsonb)",
                         (job_id, "testing.sleep_effect", json.dumps({"seconds": 0})))
        # when its message is sent and delivered (the relay publishes it)
        deadline = time.monotonic() + 20
        row = iso.job(job_id)
        while row["status"] in {"queued", "running"} and time.monotonic() < deadline:
            time.sleep(0.2)
            row = iso.job(job_id)
        # then the job is not left queued for hours: it is cancelled, visibly
        assert row["status"] == "cancelled", (
            {k: row[k] for k in ("status", "published_at", "delivered_at", "attempts")},
            worker.tail(1500))
    finally:
        worker.stop()
