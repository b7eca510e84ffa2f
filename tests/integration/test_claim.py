"""The claim on every supported PostgreSQL (15-18): what a delivery of each state gets.

Run against the embedded PostgreSQL 18 and, in CI, the machine's PostgreSQL 15, where the
claim's inspection once subtracted '-infinity' (an error before 17): every duplicate of a
finished job, every takeover after a SIGKILL and every poison pill fell over (review N1).
These call the claim the worker calls, with owner tokens of real dead and live processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests.conftest import Services
from tests.integration.test_audit_helpers import Isolated, isolated
from workers import identity, jobstore

LOST_AFTER = 3.0  # WARDEN_RELAY_LOST_AFTER in tests

@pytest.fixture(scope="module", autouse=True)
def own_database(services: Services) -> Iterator[Isolated]:
    """A database of this module's own: the suite's shared one has a worker and relays,
    which would send and run these hand-made jobs (a lapsed `running` row is re-sent)."""
    with isolated(services) as own:
        yield own


@pytest.fixture
def db(own_database: Isolated) -> Iterator[psycopg.Connection]:
    with own_database.connect() as conn:
        yield conn



def _insert(db: psycopg.Connection, **cols: object) -> str:
    job_id = str(uuid.uuid4())
    cols = {"type": "platform.ping", "params": json.dumps({}), **cols}
    names = ", ".join(["id", *cols])
    marks = ", ".join(["%s"] * (len(cols) + 1))
    db.execute(f"INSERT INTO job_runs ({names}) VALUES ({marks})", [job_id, *cols.values()])
    return job_id


def _row(db: psycopg.Connection, job_id: str) -> dict[str, object]:
    cur = db.execute("SELECT * FROM job_runs WHERE id = %s", (job_id,))
    row = cur.fetchone()
    assert row is not None
    return dict(zip([d.name for d in cur.description or []], row, strict=True))


def _claim(job_id: str, owner: str | None = None) -> jobstore.Claim:
    return jobstore.claim(job_id, "platform.ping", {}, owner or identity.new_token(),
                          "test:1", 5, adopt=False)


@pytest.fixture(scope="module")
def dead_owner() -> str:
    """The owner token of a process of this kernel that has exited (a SIGKILLed worker)."""
    child = subprocess.Popen([sys.executable, "-c",
                              "from workers import identity; print(identity.new_token())"],
                             stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=60)
    return out.strip()


def _running(db: psycopg.Connection, owner: str, *, attempts: int, max_attempts: int = 3,
             lapsed: float | None = None, lapses: int = 0) -> str:
    """A running job at `attempts`; its lease live, or lapsed `lapsed` seconds ago."""
    job_id = _insert(db, status="running", attempts=attempts, max_attempts=max_attempts,
                     epoch=attempts, owner=owner, lapses=lapses)
    lease = f"now() - interval '{lapsed} seconds'" if lapsed is not None else \
        "now() + interval '60 seconds'"
    db.execute(f"UPDATE job_runs SET lease_expires_at = {lease}, started_at = now(), "
               "published_at = now() - interval '1 minute' WHERE id = %s", (job_id,))
    return job_id


def test_a_duplicate_of_a_succeeded_job_is_done(services: Services, db: psycopg.Connection
                                                ) -> None:
    # given a job that succeeded (its claim cleared next_attempt_at; no countdown)
    job_id = _insert(db, status="succeeded", attempts=1, epoch=1,
                     result=json.dumps({"ok": True}))
    # when a duplicate message arrives; then it is recognised as done, with the result
    claim = _claim(job_id)
    assert (claim.action, claim.result) == ("done", {"ok": True})


def test_a_job_whose_owner_died_on_this_kernel_is_taken_over_at_once(
        services: Services, db: psycopg.Connection, dead_owner: str) -> None:
    # given a running job whose lease is live but whose owner process has exited
    job_id = _running(db, dead_owner, attempts=1)
    # when its message is redelivered (reject_on_worker_lost); then it is taken over now
    claim = _claim(job_id)
    assert (claim.action, claim.attempts, claim.epoch) == ("run", 2, 2)


def test_a_job_killed_on_its_last_attempt_is_dead(
        services: Services, db: psycopg.Connection, dead_owner: str) -> None:
    job_id = _running(db, dead_owner, attempts=3)
    claim = _claim(job_id)
    assert claim.action == "dead"
    row = _row(db, job_id)
    assert (row["status"], row["error_code"]) == ("dead", "worker_lost")


def test_a_live_owner_keeps_its_job(services: Services, db: psycopg.Connection) -> None:
    # given a running job owned by this very process (alive), lease lapsed a moment ago
    # (as during a database outage that stopped its heartbeats)
    job_id = _running(db, identity.new_token(), attempts=3, lapsed=1)
    # when another delivery arrives; then it waits: the owner may renew its lease
    assert _claim(job_id).action == "busy"
    row = _row(db, job_id)
    assert (row["status"], row["attempts"], row["epoch"]) == ("running", 3, 3)


def test_an_unproven_owner_long_lapsed_is_taken_over_without_spending_the_last_attempt(
        services: Services, db: psycopg.Connection) -> None:
    # given a job on its last attempt whose owner (another host: cannot be proven dead)
    # let the lease lapse longer ago than WARDEN_RELAY_LOST_AFTER
    other_host = "elsewhere:0000000000000000:1:4242:1:abcdef"
    job_id = _running(db, other_host, attempts=3, lapsed=LOST_AFTER + 5)
    # when a delivery arrives; then it takes the job over; the attempt is not spent again
    claim = _claim(job_id)
    assert (claim.action, claim.attempts, claim.epoch) == ("run", 3, 4)
    assert _row(db, job_id)["lapses"] == 1


def test_a_job_that_lapses_too_often_on_its_last_attempt_ends_dead(
        services: Services, db: psycopg.Connection) -> None:
    other_host = "elsewhere:0000000000000000:1:4242:1:abcdef"
    job_id = _running(db, other_host, attempts=3, lapsed=LOST_AFTER + 5,
                      lapses=jobstore.MAX_LAPSES)
    assert _claim(job_id).action == "dead"
    row = _row(db, job_id)
    assert (row["status"], row["error_code"]) == ("dead", "worker_lost")
    assert "lapsed" in str(row["error_message"])


def test_a_queued_job_due_now_runs_and_an_early_copy_waits(
        services: Services, db: psycopg.Connection) -> None:
    due = _insert(db)
    assert _claim(due).action == "run"
    later = _insert(db)
    db.execute("UPDATE job_runs SET next_attempt_at = now() + interval '30 seconds' "
               "WHERE id = %s", (later,))
    early = _claim(later)
    assert early.action == "early" and 25 < early.due_in <= 30


def test_a_message_with_no_row_is_foreign_unless_adoption_is_allowed(
        services: Services) -> None:
    assert _claim(str(uuid.uuid4())).action == "foreign"


def test_an_adopted_singleton_waits_for_the_running_one(services: Services,
                                                       db: psycopg.Connection) -> None:
    # given a job of a singleton type running under a live owner
    kind = "testing.singleton_sleep"
    holder = _insert(db, type=kind, status="running", attempts=1, epoch=1,
                     owner=identity.new_token())
    db.execute("UPDATE job_runs SET lease_expires_at = now() + interval '60 seconds' "
               "WHERE id = %s", (holder,))
    # when a bare `celery call` message of that type arrives where adoption is allowed
    bare = str(uuid.uuid4())
    got = jobstore.claim(bare, kind, {"seconds": 0}, identity.new_token(), "w", 5,
                         singleton=True, adopt=True)
    # then it is given a row but waits its turn (deferred, no attempt spent)
    assert got.action == "singleton_busy", got
    row = _row(db, bare)
    assert (row["status"], row["attempts"], row["source"]) == ("queued", 0, "celery")
    # and once the holder ended, its next delivery runs it
    db.execute("UPDATE job_runs SET status = 'succeeded' WHERE id = %s", (holder,))
    again = jobstore.claim(bare, kind, {"seconds": 0}, identity.new_token(), "w", 5,
                           singleton=True, adopt=True)
    assert again.action == "run", again


def test_an_operator_retry_gives_back_the_spared_lapses(db: psycopg.Connection) -> None:
    # given a job that ended dead after lapsing on its last attempt
    other_host = "elsewhere:0000000000000000:1:4242:1:abcdef"
    job_id = _running(db, other_host, attempts=3, lapsed=LOST_AFTER + 5,
                      lapses=jobstore.MAX_LAPSES)
    assert _claim(job_id).action == "dead"
    # when an operator retries it; then its new last attempt is spared like a fresh job's
    jobstore.operator_retry(job_id)
    assert _row(db, job_id)["lapses"] == 0
