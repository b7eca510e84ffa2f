"""`xp_opening_balances` racing the XP flows (review N2), with real concurrent transactions.

An XP flow holds its character's row lock (award or spend written, not yet committed); the
migration's batch over that character waits for it in another thread; the flow commits.
The opening entry must then be what the character held before the ledger: the flow's own
ledger row already accounts for the flow's change.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from sqlalchemy.orm import Session

from domain import rules
from tasks.data_migrations import opening_balances as ob
from tasks.data_migrations.registry import Batch, Context
from tasks.xp import service as xp
from tests.integration.test_data_migration_service import isolated
from workers.db import get_sessionmaker, session_scope

__all__ = ["isolated"]


@pytest.fixture(scope="module")
def odb(isolated: psycopg.Connection) -> psycopg.Connection:
    """A database of this module's own (verify counts every character of the database)."""
    return isolated


def _batch_in_thread(run_no: int, cid: int) -> tuple[threading.Thread, list[BaseException]]:
    """The migration's batch over character `cid`, started in a thread; its errors."""
    errors: list[BaseException] = []

    def batch() -> None:
        try:
            with session_scope() as s:
                ob.transform(s, Context(ob.NAME, run_no, None), Batch(cid - 1, cid, 1))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=batch)
    thread.start()
    return thread, errors


def _pre_ledger_character(db: psycopg.Connection, xp_held: int) -> int:
    """A character older than the ledger: xp and no ledger row."""
    row = db.execute("INSERT INTO characters (name, owner_id, chronicle_id, xp) "
                     "VALUES ('old', 1, 1, %s) RETURNING id", (xp_held,)).fetchone()
    assert row is not None
    return int(row[0])


def _award(db: psycopg.Connection, cid: int) -> Callable[[Session], Any]:
    scene = db.execute("INSERT INTO scenes (chronicle_id, name, finished) VALUES (1, 's', true) "
                       "RETURNING id").fetchone()
    assert scene is not None
    db.execute("INSERT INTO scene_participants VALUES (%s, %s)", (scene[0], cid))
    return lambda s: xp.award_scene(s, int(scene[0]), {cid: True})


def _spend(db: psycopg.Connection, cid: int) -> Callable[[Session], Any]:
    return lambda s: xp.spend(s, cid, "strength", 2)


def _waiting_for_a_lock(db: psycopg.Connection, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = db.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a "
                         "ON a.pid = l.pid WHERE NOT l.granted "
                         "AND a.datname = current_database()").fetchone()
        if row and row[0]:
            return
        time.sleep(0.02)
    raise AssertionError("the migration batch never waited for the flow's lock")


@pytest.mark.parametrize(("flow", "change"), [
    (_award, rules.SCENE_AWARD_XP),
    (_spend, -rules.xp_cost("attribute", 2)),
])
def test_a_batch_racing_an_xp_flow_writes_the_balance_held_before_the_ledger(
        odb: psycopg.Connection, flow: Callable[[psycopg.Connection, int], Any],
        change: int) -> None:
    # given a character that held 10 XP before the ledger existed
    cid = _pre_ledger_character(odb, 10)
    run = flow(odb, cid)
    # and an XP flow (award or spend) written in an open transaction, holding its row lock
    session = get_sessionmaker()()
    try:
        run(session)
        # when the migration's batch over that character runs meanwhile (it waits) ...
        migration, errors = _batch_in_thread(1, cid)
        _waiting_for_a_lock(odb)
        # ... and the flow commits
        session.commit()
    finally:
        session.close()
    migration.join(30)
    assert not migration.is_alive() and not errors, errors
    # then the opening entry is the 10 XP held before the ledger, the flow's change is its
    # own ledger row, and xp equals the ledger sum (before the fix: the change counted twice)
    ledger = odb.execute("SELECT kind, delta FROM xp_ledger WHERE character_id = %s "
                         "ORDER BY kind", (cid,)).fetchall()
    held = odb.execute("SELECT xp FROM characters WHERE id = %s", (cid,)).fetchone()
    assert held == (10 + change,)
    assert sorted(ledger) == sorted([("adjust", 10),
                                     ("award" if change > 0 else "spend", change)])
    # and the migration's verify counts nobody: it can succeed
    with session_scope() as s:
        assert ob.verify(s) == 0


def test_two_batches_over_the_same_characters_write_one_opening_entry(
        odb: psycopg.Connection) -> None:
    # given a character that held 10 XP before the ledger, and a batch of the migration over
    # it still open (a run taken over while its batch had not committed)
    cid = _pre_ledger_character(odb, 10)
    session = get_sessionmaker()()
    try:
        ob.transform(session, Context(ob.NAME, 1, None), Batch(cid - 1, cid, 1))
        # when a second batch over the same character runs meanwhile (it waits) ...
        second, errors = _batch_in_thread(2, cid)
        # (it waits for the first's locks; before the fix it did not, and wrote at once)
        deadline = time.monotonic() + 30
        while second.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(AssertionError):
                _waiting_for_a_lock(odb, timeout=0.2)
                break
        # ... and the first commits
        session.commit()
    finally:
        session.close()
    second.join(30)
    assert not second.is_alive() and not errors, errors
    # then the character has one opening entry of 10 (before the fix: two, 20 in all)
    ledger = odb.execute("SELECT kind, delta FROM xp_ledger WHERE character_id = %s",
                         (cid,)).fetchall()
    assert ledger == [("adjust", 10)]
    with session_scope() as s:
        assert ob.verify(s) == 0
