"""The job core's smaller promises (issue 5, point 8): bad producers, bad tokens, bounds."""

from __future__ import annotations

import subprocess
import sys
import uuid

import httpx
import psycopg
import pytest

from tests.conftest import ROOT, Proc, Services, wait_for_status
from workers.app import app


def test_bare_celery_call_args_fail_cleanly_and_the_list_still_answers(
    client: httpx.Client, worker: Proc
) -> None:
    # given a message sent the bare Celery way, with positional args that are no params object
    job_id = str(uuid.uuid4())
    app.send_task("platform.ping", args=["hello"], task_id=job_id)
    # then the job is recorded failed with invalid_params, never run
    try:
        job = wait_for_status(job_id, {"failed", "succeeded"}, timeout=30)
    except AssertionError as exc:
        raise AssertionError(worker.tail(6000)) from exc
    assert (job["status"], job["error_code"], job["source"]) == ("failed", "invalid_params",
                                                                 "celery")
    # and listing jobs (which shows it) answers 200, its params wrapped, never a 500
    listed = client.get("/v1/jobs", params={"limit": 500})
    assert listed.status_code == 200, listed.text
    shown = [j for j in listed.json()["items"] if j["id"] == job_id]
    assert shown and shown[0]["params"] == {"_raw": "hello"}


def test_a_celery_call_with_a_params_object_is_adopted_and_runs(worker: Proc) -> None:
    job_id = str(uuid.uuid4())
    app.send_task("platform.ping", kwargs={"params": {"echo": "adopted"}}, task_id=job_id)
    job = wait_for_status(job_id, {"succeeded", "failed"}, timeout=30)
    assert (job["status"], job["source"], job["attempts"]) == ("succeeded", "celery", 1)
    assert job["result"] == {"echo": "adopted", "job_id": job_id}


def test_pools_without_time_limits_are_refused(services: Services) -> None:
    for pool in ("threads", "solo"):
        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-P", pool],
            cwd=ROOT, env=services.env(), capture_output=True, text=True, timeout=60,
            check=False)
        assert out.returncode != 0, pool
        assert "not supported" in out.stdout + out.stderr, (pool, out.stderr[-2000:])


def test_conflicts_do_not_leak_api_connections(
    client: httpx.Client, db: psycopg.Connection
) -> None:
    # given a key used once
    key = f"leak-{uuid.uuid4()}"
    first = client.post("/v1/jobs", json={"type": "platform.ping", "params": {"echo": "a"},
                                          "idempotency_key": key})
    assert first.status_code == 202
    # when many requests reuse it for other params (409 each)
    for n in range(40):
        r = client.post("/v1/jobs", json={"type": "platform.ping",
                                          "params": {"echo": f"b{n}"}, "idempotency_key": key})
        assert r.status_code == 409
    # then the API holds no more than its pool of connections (10), and none is abandoned
    row = db.execute("SELECT count(*) FROM pg_stat_activity "
                     "WHERE application_name = 'warden-api'").fetchone()
    assert row is not None and row[0] <= 10, row


def test_countdown_is_bounded_everywhere(services: Services, client: httpx.Client) -> None:
    r = client.post("/v1/jobs", json={"type": "platform.ping", "countdown": 3601})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "countdown"]
    out = subprocess.run([sys.executable, "-m", "cli.main", "enqueue", "platform.ping",
                          "--countdown", "5000"], cwd=ROOT, env=services.env(),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert "countdown" in out.stderr.lower()
    from workers.enqueue import InvalidCountdown, prepare

    with pytest.raises(InvalidCountdown):
        prepare("platform.ping", {}, countdown=-1)


def test_unknown_and_malformed_tokens_cost_no_write(services: Services) -> None:
    from workers.tokens import TokenCache

    cache = TokenCache(ttl=0)
    # a string that is not token-shaped never reaches the database
    assert cache.cached("not a token at all") == (True, None)
    # an unknown token-shaped one is looked up once, then answered from memory for a while
    unknown = "wdn_" + "x" * 43
    assert cache.cached(unknown) == (False, None)
    assert cache.lookup(unknown) is None
    assert cache.cached(unknown) == (True, None)


def test_api_401_for_garbage_tokens(api: str) -> None:
    r = httpx.get(f"{api}/v1/jobs", headers={"Authorization": "Bearer %%%garbage%%%"})
    assert r.status_code == 401
