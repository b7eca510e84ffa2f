"""Review: a singleton's "one running job of the type at a time" must survive a stalled holder.

_CLAIM_SINGLETON (workers/jobstore.py) lets a second job of the type start as soon as the
first one's lease has lapsed (`o.lease_expires_at > now()`). Nothing fences the first run:
its own job row keeps its epoch (nobody claimed THAT job), so when the stalled process
resumes, its heartbeat extends its lease again and its fenced transaction commits. Two
runs of the type then overlap, each committing its effect.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow

REVIEW_MODULES = '["tests.support.tasks", "tests.support.review_tasks"]'



def _first_start_pid(iso: Isolated, job_id: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while iso.count("SELECT count(*) FROM test_starts WHERE job_id = %s", job_id) == 0:
        assert time.monotonic() < deadline, iso.job(job_id)
        time.sleep(0.05)
    return iso.count("SELECT pid FROM test_starts WHERE job_id = %s ORDER BY id LIMIT 1", job_id)


def test_a_stalled_singleton_holder_never_overlaps_the_next_one(
    services: Services, iso: Isolated
) -> None:
    # given a worker with two processes running a long singleton job; a holder whose lease
    # lapsed is fenced off only once it lapsed WARDEN_RELAY_LOST_AFTER ago (it may be riding
    # out a database outage: ADR 0012), 8 s here
    env = {**iso.env, "WARDEN_EXTRA_TASK_MODULES": REVIEW_MODULES,
           "WARDEN_RELAY_LOST_AFTER": "8"}
    worker = start_worker(services, "single", concurrency=2, env=env)
    stalled = 0
    try:
        first = iso.insert_job("review.singleton_effect", {"seconds": 6})
        stalled = _first_start_pid(iso, first)
        # when its process stalls (a GC pause, SIGSTOP, a VM freeze) past its lease
        os.kill(stalled, signal.SIGSTOP)
        deadline = time.monotonic() + 20
        while iso.count("SELECT count(*) FROM job_runs WHERE id = %s "
                        "AND lease_expires_at < now()", first) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # and a second job of the type arrives, runs and ends
        second = iso.insert_job("review.singleton_effect", {"seconds": 0})
        second_done = iso.wait(second, {"succeeded", "failed", "dead"}, timeout=60)
        # and the stalled holder resumes
        os.kill(stalled, signal.SIGCONT)
        stalled = 0
        first_done = iso.wait(first, {"succeeded", "failed", "dead"}, timeout=60)
        # then the two committed runs did not overlap: the one that committed second
        # started after the other committed
        runs = []
        for job_id in (first, second):
            with_effect = iso.count("SELECT pid FROM test_effects WHERE job_id = %s", job_id)
            started = iso.job(job_id)
            runs.append((job_id, with_effect, started))
        intervals = []
        for job_id, pid, _ in runs:
            import psycopg

            with psycopg.connect(iso.database_url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT (SELECT created_at FROM test_starts WHERE job_id = %s AND pid = %s "
                    "        ORDER BY id DESC LIMIT 1), "
                    "       (SELECT created_at FROM test_effects WHERE job_id = %s)",
                    (job_id, pid, job_id, )).fetchone()
            assert row is not None
            intervals.append(row)
        (s1, e1), (s2, e2) = sorted(intervals)
        assert (first_done["status"], second_done["status"]) == ("succeeded", "succeeded")
        assert s2 >= e1, (f"overlap: first committed run {s1}..{e1}, second {s2}..{e2}",
                          first_done["epoch"], second_done["epoch"])
    finally:
        if stalled:
            os.kill(stalled, signal.SIGCONT)
        worker.stop()
