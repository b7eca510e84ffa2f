"""The data-migration runner in-process, on a database of its own (it scans whole tables).

Failures, timeouts and slowness are injected with real Postgres triggers on the target
table, and throttling with a real open transaction: no mocks.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from tasks.data_migrations import opening_balances, service, spent_xp
from tests.conftest import Services, fresh_database
from workers.db import reset_engine, session_scope
from workers.settings import get_settings

LEGACY = spent_xp.NAME
OPENING = opening_balances.NAME


def _point(url: str) -> None:
    os.environ["WARDEN_DATABASE_URL"] = url
    get_settings.cache_clear()
    reset_engine()


@pytest.fixture(scope="module")
def isolated(services: Services) -> Iterator[psycopg.Connection]:
    """A migrated database of this module's own; this process's engine points at it."""
    with fresh_database(services) as url:
        saved = os.environ["WARDEN_DATABASE_URL"]
        _point(url)
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                yield conn
        finally:
            _point(saved)


@pytest.fixture
def mdb(isolated: psycopg.Connection) -> Iterator[psycopg.Connection]:
    """Empty character data and migration state for each test."""
    isolated.execute("TRUNCATE characters, scenes, data_migrations CASCADE")
    isolated.execute("DROP TRIGGER IF EXISTS test_inject ON xp_spend_requests")
    yield isolated
    isolated.execute("DROP TRIGGER IF EXISTS test_inject ON xp_spend_requests")


@pytest.fixture
def setting() -> Iterator[Callable[[str, str], None]]:
    """Set WARDEN_* settings for this test (real settings, re-read), restored after."""
    saved: dict[str, str | None] = {}

    def put(name: str, value: str) -> None:
        saved.setdefault(name, os.environ.get(name))
        os.environ[name] = value
        get_settings.cache_clear()

    yield put
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    get_settings.cache_clear()


def _legacy(db: psycopg.Connection, n: int) -> list[int]:
    """n characters, each with two legacy records: one of each shape (DOMAIN.md)."""
    rows = db.execute(
        "INSERT INTO characters (name, owner_id, chronicle_id, created_at) "
        "SELECT 'legacy ' || g, 1, 1, timestamptz '2024-05-01 12:00+00' "
        "FROM generate_series(1, %s) g RETURNING id", (n,)).fetchall()
    ids = sorted(r[0] for r in rows)
    db.execute("""
        UPDATE characters SET spent_xp = jsonb_build_array(
            jsonb_build_object('index', 0, 'trait', 'Strength', 'value', 'strength',
                               'cost', 8, 'category', 'attribute', 'approved', 'Approved',
                               'timestamp', '2025-01-02T03:04:05+00:00',
                               'approved_at', '2025-01-03T00:00:00+00:00'),
            jsonb_build_object('index', id || '_ability_brawl_2', 'trait', 'Brawl',
                               'value', 2, 'cost', 2, 'approved', 'Pending'))
        WHERE id = ANY(%s)""", (ids,))
    return ids


def _inject(db: psycopg.Connection, body: str) -> None:
    """A BEFORE INSERT trigger on xp_spend_requests running `body` (plpgsql) per row."""
    db.execute(f"CREATE OR REPLACE FUNCTION test_inject() RETURNS trigger AS $$ BEGIN {body} "
               "RETURN NEW; END $$ LANGUAGE plpgsql")
    db.execute("CREATE TRIGGER test_inject BEFORE INSERT ON xp_spend_requests "
               "FOR EACH ROW EXECUTE FUNCTION test_inject()")


def _requests(db: psycopg.Connection) -> list[tuple[Any, ...]]:
    """The migrated rows, row by row, without their ids."""
    return db.execute(
        "SELECT character_id, legacy_ref, trait_name, trait_type, trait_value, cost, state, "
        "created_at, decided_at, decided_by FROM xp_spend_requests "
        "WHERE legacy_ref IS NOT NULL ORDER BY character_id, legacy_ref").fetchall()


def _state(name: str) -> dict[str, Any]:
    with session_scope() as s:
        return service.summary(s, name)


def _batches(name: str) -> list[dict[str, Any]]:
    with session_scope() as s:
        return list(reversed(service.batches(s, name, limit=1000)))


def test_both_legacy_shapes_become_requests_and_malformed_ones_are_reported(
        mdb: psycopg.Connection) -> None:
    # given characters with records of both shapes, and one with three broken records
    ok = _legacy(mdb, 3)
    broken = _legacy(mdb, 1)[0]
    mdb.execute("""UPDATE characters SET spent_xp = spent_xp || jsonb_build_array(
        jsonb_build_object('index', 7, 'value', 'strength', 'cost', 5, 'category',
                           'attribute', 'approved', true, 'timestamp', '2025-01-01'),
        jsonb_build_object('index', '1_ability_brawl_2', 'value', 2, 'cost', 2,
                           'approved', 'Pending'),
        '"just a string"'::jsonb) WHERE id = %s""", (broken,))
    not_a_list = _legacy(mdb, 1)[0]
    mdb.execute("UPDATE characters SET spent_xp = '{\"oops\": 1}' WHERE id = %s", (not_a_list,))
    # when the migration runs
    result = service.run(LEGACY)
    # then every good record is a request with its shape's fields
    assert result["status"] == "succeeded"
    assert result["changed"] == 2 * 4
    rows = _requests(mdb)
    first = [r for r in rows if r[0] == ok[0]]
    assert [r[1:8] for r in first] == [
        ("spent_xp[0]:0", "strength", "attribute", 3, 8, "Approved",
         first[0][7]),
        (f"spent_xp[1]:{ok[0]}_ability_brawl_2", "brawl", "ability", 2, 2, "Pending",
         first[1][7]),
    ]
    assert first[0][7].isoformat() == "2025-01-02T03:04:05+00:00"  # the record's timestamp
    assert first[0][8].isoformat() == "2025-01-03T00:00:00+00:00"  # its approved_at
    assert first[1][7].isoformat() == "2024-05-01T12:00:00+00:00"  # the character's
    assert first[1][8] is None  # Pending: undecided
    # and each malformed record is reported with its character, position and why
    with session_scope() as s:
        rejected = {(r["row_id"], r["position"]): r["reason"]
                    for r in service.rejects(s, LEGACY)}
    assert rejected == {
        (broken, 2): "cost 5 matches no attribute value",
        (broken, 3): f"index names character 1, not {broken}",
        (broken, 4): "record is a string, not an object",
        (not_a_list, -1): "spent_xp is a object, not a list",
    }
    assert (result["rejected"], result["verify_remaining"]) == (4, 0)
    # when it runs again (a new pass), then it changes nothing
    again = service.run(LEGACY)
    assert (again["status"], again["changed"], again["run_no"]) == ("succeeded", 0, 2)
    assert _requests(mdb) == rows


def test_dry_run_changes_nothing(mdb: psycopg.Connection) -> None:
    # given legacy data with a malformed record and no migration state yet
    _legacy(mdb, 12)
    mdb.execute("UPDATE characters SET spent_xp = spent_xp || '[42]' "
                "WHERE id = (SELECT min(id) FROM characters)")
    before = mdb.execute("SELECT count(*) FROM data_migrations").fetchone()
    # when a dry run goes through every batch
    result = service.run(LEGACY, dry_run=True, batch_size=5)
    # then it reports what a run would do, and the data and the state are untouched
    assert (result["status"], result["rows"], result["batches"]) == ("dry_run", 12, 3)
    assert (result["changed"], result["rejected"]) == (24, 1)
    assert result["rejects"][0]["reason"] == "record is a number, not an object"
    assert result["verify_remaining"] == 25
    assert _requests(mdb) == []
    assert mdb.execute("SELECT count(*) FROM data_migration_rejects").fetchone() == (0,)
    assert mdb.execute("SELECT count(*) FROM data_migrations").fetchone() == before


def test_failure_at_batch_k_fails_retry_resumes_at_k_and_equals_a_clean_run(
        mdb: psycopg.Connection) -> None:
    # given 40 legacy characters in batches of 5, and a failure injected at batch 4
    ids = _legacy(mdb, 40)
    _inject(mdb, f"IF NEW.character_id = {ids[15]} THEN "
                 "RAISE EXCEPTION 'injected failure'; END IF;")
    # when the migration runs, then it ends failed, naming the batch and the error
    with pytest.raises(service.MigrationFailed):
        service.run(LEGACY, batch_size=5)
    failed = _state(LEGACY)
    assert failed["status"] == "failed"
    assert f"({ids[14]}, {ids[19]}]" in failed["last_error"]
    assert "injected failure" in failed["last_error"]
    assert failed["cursor"] == ids[14]
    done_before = mdb.execute("SELECT id, character_id FROM xp_spend_requests "
                              "ORDER BY id").fetchall()
    assert {c for _, c in done_before} == set(ids[:15])  # batches 1-3 committed
    batches = _batches(LEGACY)
    assert [b["status"] for b in batches] == ["succeeded"] * 3 + ["failed"]
    # when the cause is removed and the migration retried
    mdb.execute("DROP TRIGGER test_inject ON xp_spend_requests")
    result = service.run(LEGACY, batch_size=5)
    # then it resumes at batch 4 (the failed batch's row succeeds on its second try) ...
    assert (result["status"], result["attempts"]) == ("succeeded", 2)
    batches = _batches(LEGACY)
    assert batches[3]["lower_id"] == ids[14]
    assert (batches[3]["status"], batches[3]["attempts"]) == ("succeeded", 2)
    assert len(batches) == 8 and all(b["status"] == "succeeded" for b in batches)
    for earlier, later in itertools.pairwise(batches):
        assert later["lower_id"] == earlier["upper_id"]  # contiguous, never re-applied
    # ... without touching batches 1-3 again
    again = mdb.execute("SELECT id, character_id FROM xp_spend_requests WHERE "
                        "character_id = ANY(%s) ORDER BY id", (ids[:15],)).fetchall()
    assert again == done_before
    # and the data equals a clean run's, row by row
    resumed = _requests(mdb)
    mdb.execute("TRUNCATE data_migrations CASCADE")
    mdb.execute("DELETE FROM xp_spend_requests")
    clean = service.run(LEGACY, batch_size=5)
    assert clean["status"] == "succeeded"
    assert _requests(mdb) == resumed
    assert len(resumed) == 80


def test_a_batch_that_times_out_is_split_and_completes(
        mdb: psycopg.Connection, setting: Callable[[str, str], None]) -> None:
    # given inserts that take 20 ms a row and a 0.5 s statement timeout
    ids = _legacy(mdb, 20)
    setting("WARDEN_MIGRATION_STATEMENT_TIMEOUT", "0.5")
    _inject(mdb, "PERFORM pg_sleep(0.02);")
    # when a batch of 20 characters (40 rows, 0.8 s) runs
    result = service.run(LEGACY, batch_size=20)
    # then it was split in half (each split recorded with its timeout) until batches fit,
    # and everything completed
    assert result["status"] == "succeeded"
    assert len(_requests(mdb)) == 40
    batches = _batches(LEGACY)
    splits = [b for b in batches if b["status"] == "split"]
    assert splits and splits[0]["size"] == 20
    for bigger, smaller in itertools.pairwise(splits):
        assert smaller["size"] == bigger["size"] // 2
    assert all("QueryCanceled" in b["error"] for b in splits)
    done = [b for b in batches if b["status"] == "succeeded"]
    assert max(b["size"] for b in done) <= splits[-1]["size"] // 2
    assert sum(b["size"] for b in done) == 20
    assert done[-1]["upper_id"] == ids[-1]


def test_throttle_waits_out_a_long_transaction_and_records_the_pause(
        mdb: psycopg.Connection, setting: Callable[[str, str], None],
        isolated: psycopg.Connection) -> None:
    # given a transaction left open in the database, and a 0.5 s limit on transaction age
    _legacy(mdb, 10)
    setting("WARDEN_MIGRATION_MAX_TRANSACTION_SECONDS", "0.5")
    dsn = get_settings().libpq_dsn()
    with psycopg.connect(dsn) as long:
        long.execute("SELECT 1")  # BEGIN: idle in transaction from now on
        time.sleep(0.7)
        # when the migration runs, and the transaction ends 2 s later
        out: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: out.update(service.run(LEGACY)))
        started = time.monotonic()
        runner.start()
        time.sleep(2.0)
        assert runner.is_alive()  # it is waiting, not migrating
        assert _requests(mdb) == []
        long.commit()
    runner.join(30)
    wall = time.monotonic() - started
    # then it waited, recorded why and for how long, and then completed
    assert out["status"] == "succeeded"
    with session_scope() as s:
        pauses = service.pauses(s, LEGACY)
    assert [p["kind"] for p in pauses] == ["throttle"]
    assert pauses[0]["reason"].startswith("longest_transaction: transaction of pid")
    assert 1.5 <= pauses[0]["seconds"] <= wall
    state = _state(LEGACY)
    assert state["seconds_throttled"] == pytest.approx(pauses[0]["seconds"], abs=0.01)
    # and the throttled time is not running time (the ETA and rate leave it out)
    assert state["seconds_running"] < wall - pauses[0]["seconds"] + 0.5


def test_pause_stops_after_a_batch_and_resume_continues_at_the_cursor(
        mdb: psycopg.Connection) -> None:
    # given a slow migration (10 ms a row) of 40 characters in batches of 4
    ids = _legacy(mdb, 40)
    _inject(mdb, "PERFORM pg_sleep(0.01);")
    out: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: out.update(service.run(LEGACY, batch_size=4)))
    runner.start()
    deadline = time.monotonic() + 20
    while _state(LEGACY)["batches_done"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    # when an operator pauses it
    with session_scope() as s:
        service.pause(s, LEGACY, actor="test", reason="peak hours")
    runner.join(20)
    # then the run ends paused at a committed checkpoint, with nothing past it migrated
    assert out["status"] == "paused"
    paused = _state(LEGACY)
    assert paused["status"] == "paused"
    assert paused["paused"]["reason"] == "peak hours"
    cursor = paused["cursor"]
    assert cursor in ids and cursor < ids[-1]
    migrated = {r[0] for r in _requests(mdb)}
    assert migrated == {i for i in ids if i <= cursor}
    time.sleep(0.3)
    # when it is resumed, then the next run starts at the cursor and finishes
    with session_scope() as s:
        service.resume(s, LEGACY, actor="test")
    result = service.run(LEGACY, batch_size=4)
    assert result["status"] == "succeeded"
    assert result["seconds_paused"] >= 0.3
    batches = _batches(LEGACY)
    assert all(b["status"] == "succeeded" for b in batches)
    for earlier, later in itertools.pairwise(batches):
        assert later["lower_id"] == earlier["upper_id"]
    assert len(_requests(mdb)) == 80
    with session_scope() as s:
        pauses = service.pauses(s, LEGACY)
    assert pauses[0]["kind"] == "operator" and pauses[0]["seconds"] >= 0.3


def test_operator_controls_refuse_the_wrong_state_and_cancel_starts_over(
        mdb: psycopg.Connection) -> None:
    _legacy(mdb, 6)
    # given a pending migration: nothing to pause, resume, retry or cancel
    with session_scope() as s:
        for op in (service.resume, service.retry):
            with pytest.raises(service.MigrationConflict):
                op(s, LEGACY, actor="test")
        with pytest.raises(service.MigrationConflict):
            service.pause(s, LEGACY, actor="test", reason="x")
    with pytest.raises(service.MigrationUnknown):
        _state("no_such_migration")
    # when a completed migration is run again after a cancel, then a new pass starts
    assert service.run(LEGACY)["run_no"] == 1
    with session_scope() as s, pytest.raises(service.MigrationConflict):
        service.cancel(s, LEGACY, actor="test", reason="done already")
    second = service.run(LEGACY)
    assert (second["run_no"], second["changed"], second["rows"]) == (2, 0, 6)


def test_opening_balances_make_xp_equal_the_ledger_and_never_paper_over(
        mdb: psycopg.Connection) -> None:
    # given characters from before the ledger (with and without later ledger rows), one
    # with no XP, and one whose opening entry does not explain its xp
    def character(xp: int, *ledger: tuple[int, str, str]) -> int:
        row = mdb.execute("INSERT INTO characters (name, owner_id, chronicle_id, xp) "
                          "VALUES ('c', 1, 1, %s) RETURNING id", (xp,)).fetchone()
        assert row is not None
        for delta, kind, reason in ledger:
            mdb.execute("INSERT INTO xp_ledger (character_id, delta, kind, reason) "
                        "VALUES (%s, %s, %s, %s)", (row[0], delta, kind, reason))
        return int(row[0])

    old = character(10)
    later = character(5, (2, "award", "scene XP"))
    empty = character(0)
    odd = character(7, (5, "adjust", "opening balance: test"))
    # when the migration runs, then it fails verify: one character still differs
    with pytest.raises(service.MigrationFailed, match="verify: 1 rows"):
        service.run(OPENING, batch_size=2)
    state = _state(OPENING)
    assert (state["status"], state["verify_remaining"]) == ("failed", 1)
    sums = dict(mdb.execute("SELECT c.id, c.xp - coalesce(sum(l.delta), 0) FROM characters c "
                            "LEFT JOIN xp_ledger l ON l.character_id = c.id GROUP BY c.id"
                            ).fetchall())
    assert sums == {old: 0, later: 0, empty: 0, odd: 2}
    opening = dict(mdb.execute("SELECT character_id, delta FROM xp_ledger WHERE reason = %s",
                               (opening_balances.REASON,)).fetchall())
    assert opening == {old: 10, later: 3}
    # when the difference is explained (as the audit would) and the migration retried
    mdb.execute("INSERT INTO xp_ledger (character_id, delta, kind, reason) "
                "VALUES (%s, 2, 'adjust', 'audit: unexplained XP')", (odd,))
    result = service.run(OPENING, batch_size=2)
    # then it succeeds, and every character's xp equals its ledger sum
    assert (result["status"], result["attempts"], result["changed"]) == ("succeeded", 2, 2)
    # and the reverse takes out exactly the entries it made
    undone = service.reverse(OPENING, actor="test", reason="test the reverse")
    assert (undone["status"], undone["deleted"]) == ("reversed", 2)
    assert mdb.execute("SELECT count(*) FROM xp_ledger WHERE reason = %s",
                       (opening_balances.REASON,)).fetchone() == (0,)
    assert _state(OPENING)["status"] == "pending"


def test_reverse_keeps_requests_the_new_flows_have_decided(mdb: psycopg.Connection) -> None:
    # given a migrated legacy list, one of whose pending requests was denied since
    from tasks.xp import service as xp

    ids = _legacy(mdb, 3)
    service.run(LEGACY)
    pending = mdb.execute("SELECT id FROM xp_spend_requests WHERE character_id = %s "
                          "AND state = 'Pending'", (ids[0],)).fetchone()
    assert pending is not None
    with session_scope() as s:
        xp.deny_spend(s, pending[0], 77)
    # when the migration is reversed, then the other five rows go and the denied one stays
    undone = service.reverse(LEGACY, actor="test", reason="test the reverse")
    assert undone["deleted"] == 5
    assert mdb.execute("SELECT id, state FROM xp_spend_requests").fetchall() == [
        (pending[0], "Denied")]


def test_the_hourly_sweep_retries_a_failed_migration_only_while_attempts_last(
        mdb: psycopg.Connection, setting: Callable[[str, str], None]) -> None:
    # given a migration that fails every time, with a budget of two attempts per pass
    setting("WARDEN_MIGRATION_MAX_ATTEMPTS", "2")
    ids = _legacy(mdb, 4)
    _inject(mdb, f"IF NEW.character_id = {ids[0]} THEN RAISE EXCEPTION 'still broken'; END IF;")
    with pytest.raises(service.MigrationFailed):
        service.run(LEGACY, batch_size=2)
    # then the sweep plans one retry, with the failed run's key; after that try, none
    with session_scope() as s:
        plans = service.due_for_retry(s)
    assert [p.name for p in plans] == [LEGACY]
    with pytest.raises(service.MigrationFailed):
        service.run(LEGACY, batch_size=2)
    assert _state(LEGACY)["attempts"] == 2
    with session_scope() as s:
        assert service.due_for_retry(s) == []
        # an operator may still retry it: the budget bounds the automatic retries only
        assert service.retry(s, LEGACY, actor="test").name == LEGACY


def _flaky(db: psycopg.Connection, character_id: int, times: int | None) -> None:
    """Inserts for `character_id` fail with a serialization failure (transient) the first
    `times` tries (None: always). A sequence counts the tries: it is not rolled back."""
    db.execute("DROP SEQUENCE IF EXISTS test_flaky")
    db.execute("CREATE SEQUENCE test_flaky")
    limit = "true" if times is None else f"nextval('test_flaky') <= {times}"
    db.execute(
        "CREATE OR REPLACE FUNCTION test_inject() RETURNS trigger AS $$ BEGIN "
        f"IF NEW.character_id = {character_id} AND {limit} THEN RAISE EXCEPTION "
        "'could not serialize access (injected)' USING ERRCODE = 'serialization_failure'; "
        "END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
    db.execute("DROP TRIGGER IF EXISTS test_inject ON xp_spend_requests")
    db.execute("CREATE TRIGGER test_inject BEFORE INSERT ON xp_spend_requests "
               "FOR EACH ROW EXECUTE FUNCTION test_inject()")


def test_a_transient_error_retries_the_batch_with_backoff_then_fails_past_its_budget(
        mdb: psycopg.Connection, setting: Callable[[str, str], None]) -> None:
    # given 10 characters in batches of 5, the 7th failing transiently twice
    ids = _legacy(mdb, 10)
    _flaky(mdb, ids[6], 2)
    waits: list[float] = []
    # when the migration runs
    result = service.run(LEGACY, batch_size=5, hooks=service.Hooks(sleep=waits.append))
    # then the batch was tried three times, after growing backoffs, and the migration
    # succeeded on its first attempt: a transient error is no failure
    assert (result["status"], result["attempts"], result["rows"]) == ("succeeded", 1, 10)
    assert len(waits) == 2 and 0 < waits[0] <= waits[1]
    assert [(b["status"], b["attempts"]) for b in _batches(LEGACY)] == [
        ("succeeded", 1), ("succeeded", 3)]
    assert len(_requests(mdb)) == 20
    # given a budget of two tries per batch, and a transient error that does not go away
    setting("WARDEN_MIGRATION_BATCH_ATTEMPTS", "2")
    mdb.execute("DELETE FROM xp_spend_requests")
    _flaky(mdb, ids[6], None)
    # when a new pass runs, then past the budget the migration is failed, saying why
    with pytest.raises(service.MigrationFailed, match="try 2"):
        service.run(LEGACY, batch_size=5, hooks=service.Hooks(sleep=waits.append))
    failed = _state(LEGACY)
    assert failed["status"] == "failed" and "could not serialize" in failed["last_error"]
    assert [(b["status"], b["attempts"]) for b in _batches(LEGACY) if b["run_no"] == 2] == [
        ("succeeded", 1), ("failed", 2)]


def test_lock_waits_on_the_target_table_throttle_the_run(
        mdb: psycopg.Connection, setting: Callable[[str, str], None]) -> None:
    # given legacy characters, and two sessions queued behind a row lock on characters
    # (a character without legacy data: the migration itself does not need that row)
    _legacy(mdb, 6)
    row = mdb.execute("INSERT INTO characters (name, owner_id, chronicle_id) "
                      "VALUES ('busy', 1, 1) RETURNING id").fetchone()
    assert row is not None
    setting("WARDEN_MIGRATION_MAX_LOCK_WAITS", "1")
    dsn = get_settings().libpq_dsn()
    with psycopg.connect(dsn) as holder:
        holder.execute("SELECT 1 FROM characters WHERE id = %s FOR UPDATE", row)
        waiters = [threading.Thread(target=_update_with_new_connection, args=(dsn, row[0]))
                   for _ in range(2)]
        for w in waiters:
            w.start()
        deadline = time.monotonic() + 10
        while mdb.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                          "'Lock'").fetchone() != (2,):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # when the migration runs, and the lock is released 1.5 s later
        out: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: out.update(service.run(LEGACY)))
        runner.start()
        time.sleep(1.5)
        assert runner.is_alive() and _requests(mdb) == []  # waiting, not migrating
        holder.commit()
    runner.join(30)
    for w in waiters:
        w.join(10)
    # then it waited for the queue to drain, recorded why and how long, and completed
    assert out["status"] == "succeeded"
    with session_scope() as s:
        pauses = service.pauses(s, LEGACY)
    assert [p["kind"] for p in pauses] == ["throttle"]
    assert pauses[0]["reason"] == ("lock_waits: 2 sessions waiting for locks on characters "
                                   "(limit 1)")
    assert pauses[0]["seconds"] >= 1.0


def _update_with_new_connection(dsn: str, character_id: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE characters SET name = 'waited' WHERE id = %s", (character_id,))


def test_health_checks_are_pluggable(mdb: psycopg.Connection,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # given the migration with a health check of its own that says "wait" twice
    from tasks.data_migrations import registry

    class Window:
        name = "maintenance_window"
        asked = 0

        def __call__(self, session: Any, table: str) -> str | None:
            self.asked += 1
            return f"{table} is being repacked" if self.asked <= 2 else None

    window = Window()
    monkeypatch.setitem(registry._REGISTRY, LEGACY, dataclasses.replace(
        registry.get(LEGACY), health_checks=(window,)))
    _legacy(mdb, 3)
    # when it runs, then that check paused it, recorded with its reason, and it completed
    result = service.run(LEGACY, hooks=service.Hooks(sleep=lambda _: None))
    assert result["status"] == "succeeded" and window.asked >= 3
    with session_scope() as s:
        pauses = service.pauses(s, LEGACY)
    assert [(p["kind"], p["reason"]) for p in pauses] == [
        ("throttle", "maintenance_window: characters is being repacked")]


def test_the_batch_size_adapts_to_the_time_budget_within_bounds(
        mdb: psycopg.Connection, setting: Callable[[str, str], None]) -> None:
    # given 60 legacy characters, batches starting at 4 and bounded to 2..12 characters
    ids = _legacy(mdb, 60)
    setting("WARDEN_MIGRATION_BATCH_INITIAL", "4")
    setting("WARDEN_MIGRATION_BATCH_MIN", "2")
    setting("WARDEN_MIGRATION_BATCH_MAX", "12")
    # when fast batches run (well inside the 1 s budget), then each grows by 1.5x to the top
    service.run(LEGACY)
    assert [b["size"] for b in _batches(LEGACY)] == [4, 6, 9, 12, 12, 12, 5]
    # when a new pass meets slow rows (30 ms each, 2 per character) for its first 18
    # characters under a 0.2 s budget, then each batch over it halves the next one
    setting("WARDEN_MIGRATION_BATCH_SECONDS", "0.2")
    _inject(mdb, f"IF NEW.character_id <= {ids[17]} THEN PERFORM pg_sleep(0.03); END IF;")
    result = service.run(LEGACY)
    sizes = [b["size"] for b in _batches(LEGACY) if b["run_no"] == 2]
    assert sizes[:3] == [12, 6, 3]
    assert max(sizes[3:]) > 3 and sum(sizes) == 60  # and it grows again once rows are fast
    assert result["status"] == "succeeded"


def test_a_pause_or_cancel_racing_a_handover_is_never_undone_by_the_successor(
        mdb: psycopg.Connection) -> None:
    from workers.db import get_sessionmaker

    _legacy(mdb, 12)
    successors: list[str] = []

    def submit(s: Any, params: dict[str, Any], key: str, countdown: float) -> tuple[str, Any]:
        job_id, _ = service.successor_in(s, params, key, countdown)
        successors.append(job_id)
        return job_id, lambda: None  # no broker here: the test runs the successor itself

    def job() -> str:
        with session_scope() as s:
            return service.successor_in(s, {"name": LEGACY}, f"test-{time.time_ns()}", 0)[0]

    def hooks(job_id: str, on_batch: Callable[[], None]) -> service.Hooks:
        """A run whose time slice is over after each batch (the clock jumps), calling
        `on_batch` between the batch's commit and the handover."""
        now = [0.0]

        def progress(*_: Any, **__: Any) -> None:
            now[0] += 10_000.0
            on_batch()

        return service.Hooks(job_id=job_id, progress=progress, clock=lambda: now[0],
                             submit=submit, sleep=lambda _: None)

    def cancel() -> None:
        with session_scope() as s:
            service.cancel(s, LEGACY, actor="test", reason="cancel before the handover")

    # given a run whose first batch is followed by an operator's cancel, then its handover
    first = service.run(LEGACY, batch_size=4, hooks=hooks(job(), cancel))
    # then the run ends cancelled and queues no successor that could start a new pass
    assert first["status"] == "cancelled" and successors == []
    assert (_state(LEGACY)["status"], len(_requests(mdb))) == ("cancelled", 8)
    # given a new pass, and a pause whose transaction began before the handover and waits
    # for the state lock until after it (as an operator's request arriving mid-handover)
    pausing = get_sessionmaker()()
    began: list[bool] = []

    def begin_pause() -> None:
        if not began:
            pausing.execute(text("SELECT 1"))  # its transaction, and its now(), start here
            began.append(True)

    handed = service.run(LEGACY, batch_size=4, hooks=hooks(job(), begin_pause))
    assert handed["status"] == "handed_over" and successors == [handed["successor"]]
    service.pause(pausing, LEGACY, actor="test", reason="pause during the handover")
    pausing.commit()
    pausing.close()
    # when the successor runs, then it sees the pause as the later decision: it stops
    after = service.run(LEGACY, hooks=service.Hooks(job_id=successors[0]))
    assert (after["status"], after.get("skipped")) == ("paused", True)
    assert _state(LEGACY)["status"] == "paused"
