"""Review: an operator retry of a child must be reflected in its parent's outcome.

The child trigger (migration 0002, warden_child_status) counts a retried child back into
children_pending but leaves a `running` parent running (`ELSE status`): a parent that is
adding up its children at that moment records its totals from the children it read
(the retried one still failed) and ends `succeeded`. When the child then succeeds, the
trigger only decrements the count of a finished parent: the parent never runs again, its
result contradicts its children, and no operator action can fix it (a succeeded parent
cannot be retried, nor a succeeded child).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import redis

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow

REVIEW_MODULES = '["tests.support.tasks", "tests.support.review_tasks"]'



def test_a_child_retried_while_its_parent_adds_up_is_counted_in_the_parent(
    services: Services, iso: Isolated
) -> None:
    # given a parent whose two children fail cleanly, and which takes 10 s to add them up
    env = {**iso.env, "WARDEN_EXTRA_TASK_MODULES": REVIEW_MODULES}
    worker = start_worker(services, "fanretry", concurrency=2, env=env)
    try:
        parent = iso.insert_job("review.fan_parent_slow_resume",
                                {"chunks": 2, "resume_seconds": 10})
        deadline = time.monotonic() + 60
        while iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", parent) < 2:
            assert time.monotonic() < deadline, iso.job(parent)
            time.sleep(0.1)
        adding_up = iso.job(parent)
        assert adding_up["status"] == "running"  # adding up its (failed) children
        child = str(_child_ids(iso, parent)[1])  # n = 1
        # when, meanwhile, an operator fixes one child's input and retries it
        redis.Redis.from_url(iso.redis_url).set(f"testing:fixed:{child}", "1")
        done = subprocess.run([sys.executable, "-m", "cli.main", "retry", child,
                               "--reason", "its input was fixed"],
                              env=services.env(**iso.env), capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        # then the parent's run that was adding up is fenced off (a new epoch): it waits for
        # the child again (or, the child being quick, is already queued to add up anew)
        after = iso.job(parent)
        assert after["status"] in ("waiting", "queued", "running"), after
        assert int(after["epoch"]) > int(adding_up["epoch"]), after
        assert iso.wait(child, {"succeeded", "failed"}, timeout=30)["status"] == "succeeded"
        # then once every child has ended, the parent's outcome counts them as they ended
        time.sleep(15)  # a re-run of the parent takes 10 s
        row = iso.wait(parent, {"succeeded", "failed", "dead"}, timeout=30)
        assert row["status"] == "succeeded"
        assert row["result"] == {"total": 1, "statuses": ["failed", "succeeded"]}, (
            row["result"], row["children_pending"])
    finally:
        worker.stop()


def _child_ids(iso: Isolated, parent: str) -> list[str]:
    import psycopg

    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT id FROM job_runs WHERE parent_id = %s ORDER BY idempotency_key",
            (parent,)).fetchall()]
