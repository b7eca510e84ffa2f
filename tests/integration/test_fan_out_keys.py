"""Fan-out children's keys (`<parent id>:<n>`) belong to the fan-out (review N8).

A client once took a child's key before its parent fanned out: the parent counted two
children, one existed, and it waited for ever. The shape is reserved for fan-outs, and a
key already held (made before the reservation) fails the parent visibly.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from tests.conftest import Services
from tests.integration.test_audit_helpers import Isolated, isolated
from workers import identity, jobstore
from workers.enqueue import FanOutKeyTaken, ReservedKey, fan_out_children, submit


@pytest.fixture
def own_database(services: Services) -> Iterator[Isolated]:
    """A database of this module's own: the suite's shared one has a worker and relays,
    which would send and run these hand-made jobs (a lapsed `running` row is re-sent)."""
    with isolated(services) as own:
        yield own


@pytest.fixture
def db(own_database: Isolated) -> Iterator[psycopg.Connection]:
    with own_database.connect() as conn:
        yield conn



def test_a_child_key_shape_is_refused_to_producers(own_database: Isolated) -> None:
    with pytest.raises(ReservedKey):
        submit("platform.ping", {}, idempotency_key=f"{uuid.uuid4()}:1", source="cli")


def test_the_api_refuses_a_child_key_with_a_clear_error(client: httpx.Client) -> None:
    key = f"{uuid.uuid4()}:0"
    answer = client.post("/v1/jobs", json={"type": "platform.ping", "params": {},
                                           "idempotency_key": key})
    assert answer.status_code == 409, answer.text
    assert "reserved" in answer.json()["detail"]


@pytest.mark.parametrize("key", ["backup-verify:2", "audit-fix-7-scene-3", "beat:audit:1",
                                 "migration.retry:x:r1@0:a1", "report.deliver_alert:9"])
def test_the_api_refuses_the_keys_of_warden_s_own_jobs(client: httpx.Client, key: str) -> None:
    # given an enqueue token's client that would take the key of the next backup's verify
    # (or an audit fix's award, a beat slot...) first
    answer = client.post("/v1/jobs", json={"type": "platform.ping", "params": {}},
                         headers={"Idempotency-Key": key})
    # then it is refused (before the fix: accepted, and the producer's job never existed)
    assert answer.status_code == 409, answer.text
    assert "reserved for Warden's own jobs" in answer.json()["detail"]


def test_a_producer_whose_key_another_job_holds_fails_loudly(own_database: Isolated,
                                                           db: psycopg.Connection) -> None:
    from workers.db import session_scope
    from workers.enqueue import IdempotencyConflict, submit_in

    # given a job of another type holding a producer's key (made before keys were reserved)
    db.execute("INSERT INTO job_runs (id, type, params, idempotency_key) VALUES "
               "(%s, 'platform.ping', '{}', 'backup-verify:41')", (str(uuid.uuid4()),))
    # when the producer inserts its job under that key, then it is an error, not a job id
    # that no row has (before the fix: a no-op, and the caller recorded a phantom job)
    with pytest.raises(IdempotencyConflict), session_scope() as s:
        submit_in(s, "backup.verify", {"backup_id": 41}, idempotency_key="backup-verify:41")
    # and the same job inserted twice under its key is one job, the id of the first
    with session_scope() as s:
        first = submit_in(s, "platform.ping", {}, idempotency_key="beat:x:1", source="beat")
    with session_scope() as s:
        again = submit_in(s, "platform.ping", {}, idempotency_key="beat:x:1", source="beat")
    assert again.row_params["id"] == first.row_params["id"]


def test_a_taken_child_key_fails_the_fan_out_instead_of_a_parent_waiting_for_ever(
        services: Services, db: psycopg.Connection) -> None:
    # given a running parent, and a job that already holds its second child's key
    parent = str(uuid.uuid4())
    db.execute("INSERT INTO job_runs (id, type, params) VALUES (%s, 'platform.ping', '{}')",
               (parent,))
    claim = jobstore.claim(parent, "platform.ping", {}, identity.new_token(), "w", 5)
    db.execute("INSERT INTO job_runs (id, type, params, idempotency_key) VALUES "
               "(%s, 'platform.ping', '{}', %s)", (str(uuid.uuid4()), f"{parent}:1"))
    # when it fans out two children; then the fan-out fails with a clear code, nothing kept
    with pytest.raises(FanOutKeyTaken) as failed:
        fan_out_children(parent, claim.epoch, [("platform.ping", {}), ("platform.ping", {})])
    assert failed.value.code == "fan_out_key_taken"
    row = db.execute("SELECT status, children_total FROM job_runs WHERE id = %s",
                     (parent,)).fetchone()
    assert row == ("running", 0)
    assert db.execute("SELECT count(*) FROM job_runs WHERE parent_id = %s",
                      (parent,)).fetchone() == (0,)
