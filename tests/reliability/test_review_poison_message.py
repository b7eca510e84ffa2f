"""Review: a message the claim cannot handle must not loop through the workers forever.

JobTask._deliver turns ANY exception of the claim into `Reject(requeue=True)` after a
short sleep (workers/jobs.py), meant for "Postgres unreachable". A deterministic error is
requeued the same way: a message whose task id is not a UUID (any producer may choose it:
`send_task(task_id="nightly-1")`; the claim's uuid.UUID() raises ValueError) comes back at
once, for ever, each time holding a pool process for a second or two; no row records it.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow



def test_a_message_with_a_non_uuid_task_id_is_not_requeued_forever(
    services: Services, iso: Isolated
) -> None:
    # given a worker, and a job message sent past the enqueue path with its own task id
    from kombu import Connection

    from workers.app import app

    worker = start_worker(services, "poison", concurrency=1, env=iso.env)
    try:
        with Connection(iso.redis_url) as broker:
            app.send_task("platform.ping", kwargs={"params": {"echo": "x"}},
                          task_id="nightly-report-1", connection=broker)
        # when the worker has had 12 s with it
        time.sleep(12)
        # then it was dealt with once (recorded or dropped with an error), not re-delivered
        # over and over
        tries = worker.tail(1_000_000).count("[nightly-report-1] received")
        assert tries <= 1, f"received and requeued {tries} times in 12 s"
    finally:
        worker.stop()
