"""Review: one odd message in a long queue must not stop the relay.

With more than SCAN_LIMIT (2,000) messages waiting, BrokerView reads only the oldest one and
the relay looks its job up with `uuid.UUID(view.oldest)` (workers/relay.py, _lost). A task
id that is not a UUID (any producer may choose its own: `send_task(task_id=...)`) raises
ValueError there, before `_send`: the whole pass fails, so the unpublished jobs and the
lapsed running ones of that pass are not sent either, on every pass, until that message
leaves the queue (and with no worker consuming, never).
"""

from __future__ import annotations

import json
import time

import psycopg
import pytest
import redis

from tests.conftest import Isolated, Proc, Services

pytestmark = pytest.mark.slow



def _message(task_id: str) -> str:
    return json.dumps({"body": "W10=", "content-encoding": "utf-8",
                       "content-type": "application/json",
                       "headers": {"id": task_id, "task": "platform.ping", "lang": "py"},
                       "properties": {"delivery_tag": task_id, "body_encoding": "base64"}})


def test_an_odd_message_in_a_long_queue_does_not_stop_the_relay(
    services: Services, iso: Isolated
) -> None:
    # given a backlog of 2,001 messages whose oldest has a task id that is not a UUID
    import uuid

    r = redis.Redis.from_url(iso.redis_url)
    r.lpush("warden", _message("nightly-report-2026-12-01"))
    r.lpush("warden", *[_message(str(uuid.uuid4())) for _ in range(2000)])
    # and a job published long ago and never delivered (a relay candidate "lost?")
    lost = iso.insert_job("platform.ping", {"echo": "lost?"})
    with psycopg.connect(iso.database_url, autocommit=True) as conn:
        conn.execute("UPDATE job_runs SET published_at = now() - interval '1 minute' "
                     "WHERE id = %s", (lost,))
    # when a job is accepted while Redis refused its publish, and the relay runs
    fresh = iso.insert_job("platform.ping", {"echo": "fresh"})
    relay = Proc(["relay"], services.env(**iso.env), services.data_dir / f"relay-{fresh}.log")
    try:
        deadline = time.monotonic() + 15
        while iso.job(fresh)["published_at"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
        # then the relay still publishes it
        assert iso.job(fresh)["published_at"] is not None, relay.tail(2000)
    finally:
        relay.stop()
