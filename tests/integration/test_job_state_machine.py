"""The job state machine as a property (issue 13): random interleavings of deliveries,
duplicate deliveries, lease lapses (what a SIGKILL or a stall looks like from the database),
heartbeats, completions, failures, retries, cancels and operator retries, against the real
PostgreSQL the suite runs on, through the functions the worker calls.

Rules that must hold after every step:
- one owner per epoch, and the epoch never goes back;
- the effect is committed at most once, and exactly when the job is `succeeded`;
- the job is final, or due (queued/retrying with a due time, or running with a lease the
  relay watches);
- attempts never exceed the budget.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from sqlalchemy import text

from tests.conftest import Services
from tests.integration.test_audit_helpers import Isolated, isolated
from tests.support.tasks import EFFECTS_DDL
from workers import identity, jobstore
from workers.db import session_scope
from workers.settings import get_settings

MAX_ATTEMPTS = 3
FINAL = {"succeeded", "failed", "dead", "cancelled"}

@pytest.fixture(scope="module", autouse=True)
def own_database(services: Services) -> Iterator[Isolated]:
    """A database of this module's own: the suite's shared one has a worker and relays,
    which would send and run these hand-made jobs (a lapsed `running` row is re-sent)."""
    with isolated(services) as own:
        with own.connect() as conn:
            conn.execute(EFFECTS_DDL)
        yield own


@pytest.fixture
def db(own_database: Isolated) -> Iterator[psycopg.Connection]:
    with own_database.connect() as conn:
        yield conn



def _dead_token() -> str:
    """An owner token of a process of this kernel that has exited (a SIGKILLed worker)."""
    out = subprocess.run([sys.executable, "-c",
                          "from workers import identity; print(identity.new_token())"],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def _token(kind: str, dead: str) -> str:
    nonce = uuid.uuid4().hex[:12]
    if kind == "live":  # this very process: alive, never provably dead
        return identity.new_token()
    if kind == "dead":  # a process of this kernel that is gone
        return f"{dead.rsplit(':', 1)[0]}:{nonce}"
    return f"elsewhere:0000000000000000:1:4242:1:{nonce}"  # another host: unprovable


class JobMachine(RuleBasedStateMachine):
    database_url = ""
    dead = ""

    def __init__(self) -> None:
        super().__init__()
        self.conn = psycopg.connect(self.database_url, autocommit=True)
        self.job_id = str(uuid.uuid4())
        self.budget = MAX_ATTEMPTS
        self.runs: list[tuple[str, int]] = []
        self.owner_of: dict[int, str] = {}
        self.epoch = 0

    @initialize(budget=st.integers(1, MAX_ATTEMPTS))
    def a_job(self, budget: int) -> None:
        # budgets from 1 (every takeover is on the last attempt) to MAX_ATTEMPTS
        self.budget = budget
        self.conn.execute("INSERT INTO job_runs (id, type, params, max_attempts) "
                          "VALUES (%s, 'platform.ping', '{}', %s)", (self.job_id, budget))

    def teardown(self) -> None:
        self.conn.close()

    def _row(self) -> dict[str, object]:
        cur = self.conn.execute("SELECT * FROM job_runs WHERE id = %s", (self.job_id,))
        row = cur.fetchone()
        assert row is not None
        return dict(zip([d.name for d in cur.description or []], row, strict=True))

    def _claimed(self, owner: str) -> None:
        before = self._row()
        lapsed_long = self.conn.execute(
            "SELECT lease_expires_at < now() - make_interval(secs => %s) FROM job_runs "
            "WHERE id = %s", (get_settings().relay_lost_after, self.job_id)).fetchone()
        got = jobstore.claim(self.job_id, "platform.ping", {}, owner, "prop:1", self.budget,
                             adopt=False)
        assert got.action in {"run", "done", "final", "busy", "dead", "early"}, got
        if got.action == "run" and before["status"] == "running" and before["owner"] != owner:
            # a takeover: only from an owner proven dead, or whose lease lapsed long ago
            # (review N5: a lapse shorter than WARDEN_RELAY_LOST_AFTER may be an outage)
            assert identity.holder_is_dead(str(before["owner"])) or lapsed_long == (True,), (
                before, lapsed_long)
            if not identity.holder_is_dead(str(before["owner"])) \
                    and int(before["attempts"]) >= self.budget:  # type: ignore[call-overload]
                # the last attempt is spared, and that is counted
                assert self._row()["lapses"] == int(before["lapses"]) + 1  # type: ignore[call-overload]
        if got.action == "dead":
            # only a budget spent by owners proven dead, or lapsing too often: never a
            # healthy owner's job declared dead (review N5)
            assert before["status"] in ("queued", "retrying") or identity.holder_is_dead(
                str(before["owner"])) or before["lapses"] >= jobstore.MAX_LAPSES, before
        if got.action == "run":
            assert self.owner_of.setdefault(got.epoch, owner) == owner, "two owners, one epoch"
            self.runs.append((owner, got.epoch))

    @rule(kind=st.sampled_from(["live", "dead", "remote"]))
    def deliver(self, kind: str) -> None:
        self._claimed(_token(kind, self.dead))

    @precondition(lambda self: bool(self.runs))
    @rule(data=st.data())
    def deliver_again_to_the_same_owner(self, data: st.DataObject) -> None:
        # a claim retried after its answer was lost
        owner, _ = data.draw(st.sampled_from(self.runs))
        self._claimed(owner)

    @rule(kind=st.sampled_from(["live", "remote"]))
    def relay_resends_a_long_lapsed_job(self, kind: str) -> None:
        # what the relay does for a lease lapsed past WARDEN_RELAY_LOST_AFTER: a new delivery
        self.lease_lapses(10)
        self._claimed(_token(kind, self.dead))

    @rule(seconds=st.sampled_from([1, 10]))
    def lease_lapses(self, seconds: int) -> None:
        # a stall, a SIGKILL or a database outage: the lease runs out (1 s: shorter than
        # WARDEN_RELAY_LOST_AFTER in tests, 10 s: longer)
        self.conn.execute("UPDATE job_runs SET lease_expires_at = now() - make_interval("
                          "secs => %s) WHERE id = %s AND status = 'running'",
                          (seconds, self.job_id))

    @precondition(lambda self: bool(self.runs))
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        _, epoch = data.draw(st.sampled_from(self.runs))
        jobstore.heartbeat([(self.job_id, epoch)])

    @precondition(lambda self: bool(self.runs))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        # the effect and the outcome in one transaction, as JobTask.complete does
        _, epoch = data.draw(st.sampled_from(self.runs))
        with session_scope() as s:
            s.execute(text("INSERT INTO test_effects (job_id, pid) VALUES (:j, 0)"),
                      {"j": self.job_id})
            done = s.execute(jobstore.SUCCEED_SQL, {"id": uuid.UUID(self.job_id), "e": epoch,
                                                    "r": json.dumps({"ok": True})})
            if getattr(done, "rowcount", 0) != 1:
                s.rollback()

    @precondition(lambda self: bool(self.runs))
    @rule(data=st.data(), transient=st.booleans())
    def fail(self, data: st.DataObject, transient: bool) -> None:
        _, epoch = data.draw(st.sampled_from(self.runs))
        attempts = int(self._row()["attempts"])  # type: ignore[call-overload]
        status = ("retrying" if attempts < self.budget else "dead") if transient else "failed"
        jobstore.finish(self.job_id, epoch, status, "boom", "boom", 0.0 if transient else None)

    @rule()
    def cancel(self) -> None:
        with contextlib.suppress(jobstore.JobStateConflict):
            jobstore.operator_cancel(self.job_id)

    @rule()
    def operator_retry(self) -> None:
        with contextlib.suppress(jobstore.JobStateConflict):
            jobstore.operator_retry(self.job_id)

    @invariant()
    def holds(self) -> None:
        row = self._row()
        epoch = int(row["epoch"])  # type: ignore[call-overload]
        assert epoch >= self.epoch, "the epoch went back"
        self.epoch = epoch
        attempts = int(row["attempts"])  # type: ignore[call-overload]
        assert attempts <= int(row["max_attempts"]), row  # type: ignore[call-overload]
        # spared takeovers are bounded: a job that lapses for ever still ends
        assert int(row["lapses"]) <= jobstore.MAX_LAPSES, row  # type: ignore[call-overload]
        effects = self.conn.execute("SELECT count(*) FROM test_effects WHERE job_id = %s",
                                    (self.job_id,)).fetchone()
        assert effects == ((1,) if row["status"] == "succeeded" else (0,)), (effects, row)
        # final, or due: queued/retrying (at next_attempt_at, or now), or running with a
        # lease (the relay re-sends it once the lease lapsed long enough)
        status = row["status"]
        assert status in FINAL or status in ("queued", "retrying") or (
            status == "running" and row["lease_expires_at"] is not None), row


def test_the_job_state_machine_keeps_its_rules(own_database: Isolated) -> None:
    JobMachine.database_url = own_database.url
    JobMachine.dead = _dead_token()
    state_test = JobMachine.TestCase
    state_test.settings = settings(max_examples=80, stateful_step_count=30, deadline=None,
                                   suppress_health_check=list(HealthCheck))
    state_test("runTest").runTest()


@pytest.mark.parametrize("kind", ["remote"])
def test_a_remote_owner_that_keeps_lapsing_ends_dead_not_running_for_ever(
        services: Services, db: psycopg.Connection, kind: str) -> None:
    # given a job on its last attempt whose owners (other hosts) keep letting it lapse
    job_id = str(uuid.uuid4())
    db.execute("INSERT INTO job_runs (id, type, params, max_attempts) VALUES "
               "(%s, 'platform.ping', '{}', 1)", (job_id,))
    outcomes = []
    for _ in range(jobstore.MAX_LAPSES + 2):
        got = jobstore.claim(job_id, "platform.ping", {}, _token(kind, ""), "w", 1, adopt=False)
        outcomes.append(got.action)
        db.execute("UPDATE job_runs SET lease_expires_at = now() - interval '10 seconds' "
                   "WHERE id = %s", (job_id,))
    # then each takeover spared the last attempt, up to MAX_LAPSES, then it ended dead
    assert outcomes == ["run"] * (jobstore.MAX_LAPSES + 1) + ["dead"], outcomes
