"""A worker's shutdown does not cost a running job an attempt (drill D11: a Ctrl-C of
`make up` during a migration left it "succeeded after 2 attempt(s)").

`warden up` runs its worker with REMAP_SIGTERM=SIGQUIT: a stop is a cold shutdown after a
10 s soft shutdown, which terminates what still runs and requeues its message. The attempt
that run spent is given back; a crash (SIGKILL, OOM) still spends it.
"""

from __future__ import annotations

import signal

import pytest

from tests.conftest import Isolated, Services, start_worker

pytestmark = pytest.mark.slow


def test_a_job_stopped_by_the_worker_s_shutdown_keeps_its_attempt(
        services: Services, iso: Isolated) -> None:
    # given a worker as `warden up` runs it, and a job that runs longer than the soft
    # shutdown's 10 s
    env = {**iso.env, "REMAP_SIGTERM": "SIGQUIT"}
    first = start_worker(services, "shutdown-a", env=env)
    job = iso.insert_job("testing.sleep_effect", {"seconds": 25})
    try:
        iso.wait(job, {"running"}, timeout=60)
        assert iso.job(job)["attempts"] == 1
        # when the worker is stopped (what Ctrl-C of `make up` sends it)
        first.popen.send_signal(signal.SIGTERM)
        first.popen.wait(60)
    finally:
        first.stop()
    # then the job is back in the queue with no attempt spent, and no effect applied
    row = iso.job(job)
    assert (row["status"], row["attempts"]) == ("queued", 0), row
    assert iso.count("SELECT count(*) FROM test_effects WHERE job_id = %s", job) == 0
    # and when a worker takes it again, it succeeds on its first attempt
    second = start_worker(services, "shutdown-b", env=iso.env)
    try:
        done = iso.wait(job, {"succeeded", "failed", "dead"}, timeout=120)
    finally:
        second.stop()
    assert (done["status"], done["attempts"]) == ("succeeded", 1), done
    assert iso.count("SELECT count(*) FROM test_effects WHERE job_id = %s", job) == 1
