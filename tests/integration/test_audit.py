"""The integrity audit as the service runs it: exact findings of each of DOMAIN.md's eight
checks, exact fixes with their before/after record, a clean re-run, an exact undo, a fix
that fails half-way, and concurrent writers (rows locked in id order, re-checked)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy.exc
from psycopg.types.json import Jsonb
from sqlalchemy import text

from domain import checks
from tasks.audits import service
from tests.conftest import Services
from tests.integration.test_audit_helpers import (
    CHARACTER_CONSTRAINTS,
    Isolated,
    add_character,
    add_scene,
    add_st,
    character_rows,
    constraints_off,
    isolated,
    st_rows,
    wipe,
)
from workers.db import session_scope


@pytest.fixture(scope="module")
def iso(services: Services) -> Iterator[Isolated]:
    with isolated(services) as found:
        yield found


@pytest.fixture
def conn(iso: Isolated) -> Iterator[psycopg.Connection[Any]]:
    with iso.connect() as c:
        wipe(c)
        yield c


def _seed_eight(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """One or more known violations of each of the eight checks, and clean rows."""
    ids: dict[str, int] = {}
    with constraints_off(conn):
        ids["clean"] = add_character(conn, xp=7)
        ids["xp"] = add_character(conn, xp=-5)
        ids["status"] = add_character(conn, status="Zz")
        ids["attr"] = add_character(conn, strength=12, charisma=0)
        ids["abil"] = add_character(conn, brawl=-2, science=11)
        ids["wp"] = add_character(conn, willpower=12, temporary_willpower=11)
        ids["tmp"] = add_character(conn, willpower=4, temporary_willpower=7)
        ids["age"] = add_character(conn, age=-3, apparent_age=250)
        ids["old"] = add_character(conn, age=600)
        ids["st_keep"] = add_st(conn, 10, 1, "vampire")
        ids["st_dup1"] = add_st(conn, 10, 1, "vampire")
        ids["st_other"] = add_st(conn, 11, 1, "mage")
        ids["st_dup2"] = add_st(conn, 10, 1, "vampire")
        ids["awaiting"] = add_scene(conn, finished=True, xp_given=False)
        ids["given_unfinished"] = add_scene(conn, finished=False, xp_given=True)
        ids["scene_ok"] = add_scene(conn, finished=True, xp_given=True)
    return ids


def _expected_findings(ids: dict[str, int]) -> set[tuple[Any, ...]]:
    """(check, rule, level, entity, id, field, value, fix) of every finding of _seed_eight."""
    c = "character"
    dup = {"user_id": 10, "chronicle_id": 1, "gameline": "vampire"}
    rows: list[tuple[Any, ...]] = [
        ("negative_xp", "xp_nonnegative", "finding", c, ids["xp"], "xp", -5, 0),
        ("unknown_status", "status_known", "finding", c, ids["status"], "status", "Zz", "Un"),
        ("attribute_range", "strength_range", "finding", c, ids["attr"], "strength", 12, 10),
        ("attribute_range", "charisma_range", "finding", c, ids["attr"], "charisma", 0, 1),
        ("ability_range", "brawl_range", "finding", c, ids["abil"], "brawl", -2, 0),
        ("ability_range", "science_range", "finding", c, ids["abil"], "science", 11, 10),
        ("willpower_range", "willpower_range", "finding", c, ids["wp"], "willpower", 12, 10),
        ("willpower_range", "temporary_willpower_range", "finding", c, ids["wp"],
         "temporary_willpower", 11, 10),
        ("willpower_range", "temporary_willpower_le_willpower", "finding", c, ids["tmp"],
         "temporary_willpower", 7, 4),
        ("age_range", "age_range", "finding", c, ids["age"], "age", -3, None),
        ("age_range", "apparent_age_range", "finding", c, ids["age"], "apparent_age", 250, 200),
        ("age_range", "age_range", "finding", c, ids["old"], "age", 600, 500),
        ("duplicate_st_relationships", "st_relationship_unique", "finding", "st_relationship",
         ids["st_dup1"], "user_id, chronicle_id, gameline", dup, None),
        ("duplicate_st_relationships", "st_relationship_unique", "finding", "st_relationship",
         ids["st_dup2"], "user_id, chronicle_id, gameline", dup, None),
        ("scene_xp", "scene_awaiting_xp", "report", "scene", ids["awaiting"], "xp_given",
         {"finished": True, "xp_given": False}, None),
        ("scene_xp", "xp_given_unfinished", "finding", "scene", ids["given_unfinished"],
         "xp_given", {"finished": False, "xp_given": True}, None),
    ]
    return {(*t[:6], _j(t[6]), _j(t[7])) for t in rows}


def _findings(run_id: int) -> list[dict[str, Any]]:
    with session_scope() as s:
        return service.findings(s, run_id, limit=1000)


def _as_tuples(found: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    return {(f["check"], f["rule"], f["level"], f["entity"], f["entity_id"], f["field"],
             _j(f["value"]), _j(f["fix"])) for f in found}


def _j(value: Any) -> str:
    """JSON values (dicts too) in a hashable, order-free form."""
    return json.dumps(value, sort_keys=True)


def _audit(**kwargs: Any) -> dict[str, Any]:
    """A run as the service makes it; a fix says who and why, as an operator's must."""
    if kwargs.get("fix"):
        kwargs = {"actor": "cli:tester", "reason": "test fix", **kwargs}
    with session_scope() as s:
        return service.run_audit(s, **kwargs)


def test_each_of_the_eight_checks_finds_exactly_the_seeded_violations(
        conn: psycopg.Connection[Any]) -> None:
    # given known violations of every check, next to clean rows
    ids = _seed_eight(conn)
    before = character_rows(conn)
    # when the audit runs in check mode
    run = _audit()
    # then the stored findings are exactly the seeded violations, nothing else
    found = _findings(run["id"])
    assert _as_tuples(found) == _expected_findings(ids)
    assert {f["expected"] for f in found if f["rule"] == "strength_range"} == {"1..10"}
    # and the run's totals per check count them (a report is not a finding)
    assert run["totals"] == {
        "negative_xp": {"findings": 1, "reports": 0},
        "unknown_status": {"findings": 1, "reports": 0},
        "attribute_range": {"findings": 2, "reports": 0},
        "ability_range": {"findings": 2, "reports": 0},
        "willpower_range": {"findings": 3, "reports": 0},
        "age_range": {"findings": 3, "reports": 0},
        "duplicate_st_relationships": {"findings": 2, "reports": 0},
        "scene_xp": {"findings": 1, "reports": 1},
    }
    assert (run["mode"], run["findings"], run["reports"], run["remaining"]) == ("check", 15, 1,
                                                                                15)
    # and a check run changes nothing
    assert character_rows(conn) == before
    assert run["changed_rows"] == 0


def test_fix_applies_exact_fixes_records_them_and_a_rerun_finds_nothing_to_fix(
        conn: psycopg.Connection[Any]) -> None:
    # given the eight checks' violations
    ids = _seed_eight(conn)
    before = character_rows(conn)
    # when the audit fixes them
    run = _audit(fix=True)
    # then every row is fixed as DOMAIN.md says, and only the rows that broke a rule changed
    after = character_rows(conn)
    expected = {k: dict(v) for k, v in before.items()}
    for cid, changes in {
        ids["xp"]: {"xp": 0}, ids["status"]: {"status": "Un"},
        ids["attr"]: {"strength": 10, "charisma": 1}, ids["abil"]: {"brawl": 0, "science": 10},
        ids["wp"]: {"willpower": 10, "temporary_willpower": 10},
        ids["tmp"]: {"temporary_willpower": 4},
        ids["age"]: {"age": None, "apparent_age": 200}, ids["old"]: {"age": 500},
    }.items():
        expected[cid].update(changes)
    assert after == expected
    # the duplicate triples are gone, the lowest id of each kept
    assert [r[0] for r in st_rows(conn)] == [ids["st_keep"], ids["st_other"]]
    # and each changed row is recorded with exactly its changed columns before and after
    with session_scope() as s:
        recorded = service.changes(s, run["id"], limit=100)
    assert {(c["entity"], c["entity_id"], c["action"]): (c["before"], c["after"])
            for c in recorded} == {
        ("character", ids["xp"], "update"): ({"xp": -5}, {"xp": 0}),
        ("character", ids["status"], "update"): ({"status": "Zz"}, {"status": "Un"}),
        ("character", ids["attr"], "update"): ({"strength": 12, "charisma": 0},
                                               {"strength": 10, "charisma": 1}),
        ("character", ids["abil"], "update"): ({"brawl": -2, "science": 11},
                                               {"brawl": 0, "science": 10}),
        ("character", ids["wp"], "update"): ({"willpower": 12, "temporary_willpower": 11},
                                             {"willpower": 10, "temporary_willpower": 10}),
        ("character", ids["tmp"], "update"): ({"temporary_willpower": 7},
                                              {"temporary_willpower": 4}),
        ("character", ids["age"], "update"): ({"age": -3, "apparent_age": 250},
                                              {"age": None, "apparent_age": 200}),
        ("character", ids["old"], "update"): ({"age": 600}, {"age": 500}),
        ("st_relationship", ids["st_dup1"], "delete"): (
            {"id": ids["st_dup1"], "user_id": 10, "chronicle_id": 1, "gameline": "vampire"},
            None),
        ("st_relationship", ids["st_dup2"], "delete"): (
            {"id": ids["st_dup2"], "user_id": 10, "chronicle_id": 1, "gameline": "vampire"},
            None),
    }
    # the status change is recorded as forced (no transition leads from an unknown code)
    forced = [c for c in recorded if c["forced_status"]]
    assert [c["entity_id"] for c in forced] == [ids["status"]]
    assert "forced status change" in (forced[0]["note"] or "")
    assert run["forced_status_changes"] == 1
    # each finding says what the fix did; the scene flag has no automatic fix, the scene
    # awaiting XP got its award queued
    outcomes = {(f["rule"], f["entity_id"]): f["outcome"] for f in _findings(run["id"])}
    assert outcomes.pop(("xp_given_unfinished", ids["given_unfinished"])) == "unfixable"
    assert outcomes.pop(("scene_awaiting_xp", ids["awaiting"])) == "award_submitted"
    assert set(outcomes.values()) == {"fixed"}
    assert (run["fixed"], run["remaining"], run["changed_rows"]) == (14, 1, 10)
    # when the audit runs again right after
    again = _audit(fix=True)
    # then it finds nothing to fix: only the scene that needs a storyteller remains
    assert [(f["rule"], f["entity_id"]) for f in _findings(again["id"])
            if f["level"] == "finding"] == [("xp_given_unfinished", ids["given_unfinished"])]
    assert (again["fixed"], again["changed_rows"], again["remaining"]) == (0, 0, 1)


def test_undo_restores_the_data_exactly_and_only_once(conn: psycopg.Connection[Any]) -> None:
    # given a fix run over the eight checks' violations
    ids = _seed_eight(conn)
    before_chars, before_st = character_rows(conn), st_rows(conn)
    run = _audit(fix=True)
    assert character_rows(conn) != before_chars
    # when it is undone
    with session_scope() as s:
        outcome = service.undo_fix(s, run["id"], actor="cli:tester", reason="test undo")
    # then every row is back exactly as it was, the deleted ST rows under their old ids
    assert character_rows(conn) == before_chars
    assert st_rows(conn) == before_st
    assert outcome["reverted"] == 10 and outcome["changed_since"] == []
    # and the rule constraints are back (NOT VALID: the restored rows break them again)
    back = dict(conn.execute("SELECT conname, convalidated FROM pg_constraint "
                             "WHERE conrelid = 'characters'::regclass AND contype = 'c'"
                             ).fetchall())
    assert {name: back.get(name) for name in CHARACTER_CONSTRAINTS} == {
        name: False for name in CHARACTER_CONSTRAINTS}
    # and the undo is recorded on the run and in the operator log
    stored = _audit_run(run["id"])
    assert stored["undone_by"] == "cli:tester" and stored["undo"]["reverted"] == 10
    log = conn.execute("SELECT actor, action, target, count FROM operator_log "
                       "ORDER BY id").fetchall()
    assert log == [("cli:tester", "audit.fix", f"audit_run:{run['id']}", 10),
                   ("cli:tester", "audit.undo", f"audit_run:{run['id']}", 10)]
    # and a second undo, or the undo of a check run, is refused
    with pytest.raises(service.AlreadyUndone), session_scope() as s:
        service.undo_fix(s, run["id"], actor="cli:tester", reason="again")
    check_run = _audit()
    with pytest.raises(service.NotAFixRun), session_scope() as s:
        service.undo_fix(s, check_run["id"], actor="cli:tester", reason="not a fix")
    with pytest.raises(service.AuditRunNotFound), session_scope() as s:
        service.undo_fix(s, 999_999, actor="cli:tester", reason="none")
    # and the audit finds what it found before the fix
    assert check_run["findings"] == 15
    del ids


def _audit_run(run_id: int) -> dict[str, Any]:
    with session_scope() as s:
        return service.get_run(s, run_id)


def test_undo_leaves_rows_changed_since_the_fix_and_lists_them(
        conn: psycopg.Connection[Any]) -> None:
    # given a fix run, after which a player changed one of the fixed characters
    with constraints_off(conn):
        a = add_character(conn, xp=-5)
        b = add_character(conn, strength=12)
    run = _audit(fix=True)
    conn.execute("UPDATE characters SET xp = 3 WHERE id = %s", (a,))
    # when the fix is undone
    with session_scope() as s:
        outcome = service.undo_fix(s, run["id"], actor="cli:tester", reason="test")
    # then the untouched row is reverted, the changed one is listed and left as it is
    assert outcome["reverted"] == 1
    assert outcome["changed_since"] == [{"entity": "character", "id": a}]
    rows = character_rows(conn)
    assert rows[a]["xp"] == 3
    assert rows[b]["strength"] == 12


def test_a_fix_interrupted_by_an_error_leaves_the_data_untouched(
        conn: psycopg.Connection[Any], iso: Isolated) -> None:
    # given violations of checks 1-7, and a writer holding a lock on one ST relationship,
    # so the fix fails (lock timeout) after it has already updated the characters
    ids = _seed_eight(conn)
    before_chars, before_st = character_rows(conn), st_rows(conn)
    with iso.connect() as writer:
        writer.execute("BEGIN")
        writer.execute("SELECT 1 FROM st_relationships WHERE id = %s FOR UPDATE",
                       (ids["st_dup2"],))
        # when the fix runs
        with pytest.raises(sqlalchemy.exc.OperationalError, match="lock timeout"):
            _audit(fix=True, lock_timeout=0.5)
        writer.execute("ROLLBACK")
    # then no row changed and no run was stored: the fix is one transaction
    assert character_rows(conn) == before_chars
    assert st_rows(conn) == before_st
    assert conn.execute("SELECT count(*) FROM audit_runs").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM audit_changes").fetchone() == (0,)


def _wait_for_lock_wait(conn: psycopg.Connection[Any], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                           "'Lock' AND application_name = 'warden'").fetchone()
        if row and row[0]:
            return
        time.sleep(0.05)
    raise AssertionError("the audit never waited for the writer's lock")


def test_rows_changed_by_a_concurrent_writer_are_rechecked_not_overwritten(
        conn: psycopg.Connection[Any], iso: Isolated) -> None:
    # given three broken characters, and a writer (not yet committed) that has set the
    # first to a valid value of its own and deleted the second (a writer can do nothing
    # else to a broken row: the NOT VALID constraints refuse any UPDATE that leaves one)
    with constraints_off(conn):
        a = add_character(conn, xp=-5)
        b = add_character(conn, strength=12)
        c = add_character(conn, strength=13)
    with iso.connect() as writer:
        writer.execute("BEGIN")
        writer.execute("UPDATE characters SET xp = 3 WHERE id = %s", (a,))
        writer.execute("DELETE FROM characters WHERE id = %s", (b,))
        # when the fix runs (its scan sees the rows as they were; its locks, taken in id
        # order, wait for the writer)
        box: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: box.update(run=_audit(fix=True)))
        thread.start()
        _wait_for_lock_wait(conn)
        writer.execute("COMMIT")
    thread.join(30)
    run = box["run"]
    # then the row the writer set is re-checked under the lock and left as the writer left
    # it, not overwritten with the fix of the value the scan saw
    rows = character_rows(conn)
    assert rows[a]["xp"] == 3
    assert b not in rows
    # and only the row still broken was fixed and recorded
    assert rows[c]["strength"] == 10
    with session_scope() as s:
        recorded = service.changes(s, run["id"])
    assert [(r["entity_id"], r["before"], r["after"]) for r in recorded] == [
        (c, {"strength": 13}, {"strength": 10})]
    outcomes = {(f["entity_id"], f["value"]): f["outcome"] for f in _findings(run["id"])}
    assert outcomes == {(a, -5): "resolved_meanwhile", (b, 12): "gone", (c, 13): "fixed"}
    assert run["totals"]["negative_xp"]["resolved_meanwhile"] == 1
    assert run["remaining"] == 0


def test_each_table_is_read_once_whatever_the_number_of_rules(
        conn: psycopg.Connection[Any]) -> None:
    # given violations of all eight checks (~40 rules over three tables)
    _seed_eight(conn)
    # when the audit runs in check mode on a backend of its own (PostgreSQL 15+ keeps a
    # backend's counts pending for up to a second after its transactions end, and
    # pg_stat_xact_* shows them: a pooled connection would add earlier tests' scans), and
    # the transaction's own table statistics are read
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from sqlalchemy.pool import NullPool

    from workers.db import get_engine

    engine = create_engine(get_engine().url, poolclass=NullPool)
    try:
        with Session(engine) as s:
            run = service.run_audit(s)
            scans = {r.relname: (r.seq_scan, r.idx_scan) for r in s.execute(text(
                "SELECT relname, seq_scan, coalesce(idx_scan, 0) AS idx_scan "
                "FROM pg_stat_xact_user_tables "
                "WHERE relname IN ('characters', 'scenes', 'st_relationships')"))}
            s.rollback()
    finally:
        engine.dispose()
    # then each table was read once (characters and scenes through their violation index):
    # set-based, not one query per check or column
    assert run["findings"] == 15
    assert {t: seq + idx for t, (seq, idx) in scans.items()} == {
        "characters": 1, "scenes": 1, "st_relationships": 1}
    assert scans["characters"] == (0, 1) and scans["scenes"] == (0, 1)


def test_the_fix_locks_rows_in_id_order(conn: psycopg.Connection[Any], iso: Isolated) -> None:
    # given three broken characters, and a writer holding the middle one's row lock
    with constraints_off(conn):
        low, middle, high = (add_character(conn, xp=-1) for _ in range(3))
    with iso.connect() as writer, iso.connect() as probe:
        writer.execute("BEGIN")
        writer.execute("SELECT 1 FROM characters WHERE id = %s FOR UPDATE", (middle,))
        # when the fix runs and waits for that lock
        box: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: box.update(run=_audit(fix=True)))
        thread.start()
        _wait_for_lock_wait(conn)
        # then it already holds the lower id's lock and not yet the higher's: ascending order
        with pytest.raises(psycopg.errors.LockNotAvailable):
            probe.execute("SELECT 1 FROM characters WHERE id = %s FOR UPDATE NOWAIT", (low,))
        probe.execute("SELECT 1 FROM characters WHERE id = %s FOR UPDATE NOWAIT", (high,))
        writer.execute("COMMIT")
    thread.join(30)
    # and once the writer is gone it fixes all three
    assert box["run"]["fixed"] == 3
    assert {r["xp"] for r in character_rows(conn).values()} == {0}


def test_a_subset_of_checks_fixes_only_rows_it_can_fix_alone(
        conn: psycopg.Connection[Any]) -> None:
    # given a row breaking only the XP rule, and one breaking it and an attribute range
    with constraints_off(conn):
        only_xp = add_character(conn, xp=-1)
        both = add_character(conn, xp=-2, strength=12)
    # when only check 1 is fixed
    run = _audit(fix=True, check_names=["negative_xp"])
    # then the first is fixed; the second is left whole (its strength constraint would
    # refuse the UPDATE, and fixing strength was not asked for)
    rows = character_rows(conn)
    assert (rows[only_xp]["xp"], rows[both]["xp"], rows[both]["strength"]) == (0, -2, 12)
    assert run["checks"] == ["negative_xp"]
    assert run["totals"]["negative_xp"]["fixed"] == 1
    assert run["totals"]["negative_xp"]["blocked"] == 1
    assert run["remaining"] == 1
    assert {f["rule"] for f in _findings(run["id"])} == {"xp_nonnegative"}


def test_unknown_check_names_are_refused() -> None:
    with pytest.raises(service.UnknownCheck, match="nope"), session_scope() as s:
        service.run_audit(s, check_names=["negative_xp", "nope"])


def test_without_a_current_violation_index_the_audit_reads_the_tables_and_finds_the_same(
        conn: psycopg.Connection[Any]) -> None:
    # given violations of all eight checks, audited through the violation indexes
    _seed_eight(conn)
    with session_scope() as s:
        assert all(service.violation_index_ready(s, ix)
                   for ix in checks.VIOLATION_INDEXES.values())
        indexed = service.run_audit(s)
    # when the indexes no longer name the current rules (rules.py changed, no migration yet)
    for ix in checks.VIOLATION_INDEXES.values():
        conn.execute(f"COMMENT ON INDEX {ix.name} IS 'warden-rules:stale'")
    try:
        with session_scope() as s:
            assert not any(service.violation_index_ready(s, ix)
                           for ix in checks.VIOLATION_INDEXES.values())
            scanned = service.run_audit(s)
    finally:
        for ix in checks.VIOLATION_INDEXES.values():
            conn.execute(f"COMMENT ON INDEX {ix.name} IS '{ix.tag}'")
    # then the audit reads the tables instead, and finds exactly the same
    assert scanned["totals"] == indexed["totals"]
    assert scanned["findings"] == indexed["findings"] == 15


def _ledger_gaps(conn: psycopg.Connection[Any]) -> dict[int, tuple[int, int]]:
    """Characters whose xp is not the sum of their XP ledger: id -> (xp, ledger sum)."""
    return {int(r[0]): (int(r[1]), int(r[2])) for r in conn.execute(
        "SELECT c.id, c.xp, coalesce(sum(l.delta), 0) FROM characters c "
        "LEFT JOIN xp_ledger l ON l.character_id = c.id GROUP BY c.id, c.xp "
        "HAVING c.xp <> coalesce(sum(l.delta), 0)").fetchall()}


def test_the_negative_xp_fix_and_its_undo_each_write_their_ledger_row(
        conn: psycopg.Connection[Any]) -> None:
    # given characters whose xp equals their ledger sum, two of them below zero
    with constraints_off(conn):
        low = add_character(conn, xp=-5)
        lower = add_character(conn, xp=-12, strength=12)
        fine = add_character(conn, xp=4)
    assert _ledger_gaps(conn) == {}
    # when the audit fixes them
    run = _audit(fix=True)
    # then xp is 0 and still the sum of the ledger: one adjust row per changed xp, naming
    # the run and the job's cause
    assert {c: r["xp"] for c, r in character_rows(conn).items()} == {low: 0, lower: 0, fine: 4}
    assert _ledger_gaps(conn) == {}
    rows = conn.execute("SELECT character_id, delta, kind, reason FROM xp_ledger "
                        "WHERE reason LIKE 'audit%%' ORDER BY id").fetchall()
    assert rows == [(low, 5, "adjust", f"audit fix (run {run['id']}): xp_nonnegative"),
                    (lower, 12, "adjust", f"audit fix (run {run['id']}): xp_nonnegative")]
    # when the fix is undone
    with session_scope() as s:
        service.undo_fix(s, run["id"], actor="cli:tester", reason="test undo")
    # then xp is back below zero, and the undo wrote the compensating rows
    assert {c: r["xp"] for c, r in character_rows(conn).items()} == {
        low: -5, lower: -12, fine: 4}
    assert _ledger_gaps(conn) == {}
    assert conn.execute("SELECT character_id, delta FROM xp_ledger WHERE reason = %s "
                        "ORDER BY id", (f"undo of audit fix (run {run['id']}): xp_nonnegative",)
                        ).fetchall() == [(low, -5), (lower, -12)]


def test_a_fix_is_an_operator_action_with_a_reason_in_the_operator_log(
        conn: psycopg.Connection[Any]) -> None:
    # given a fixable violation
    with constraints_off(conn):
        broken = add_character(conn, strength=12)
    # when a fix is asked for without a reason (or a blank one), it is refused, nothing done
    for reason in (None, "  "):
        with pytest.raises(service.ReasonRequired, match="reason"), session_scope() as s:
            service.run_audit(s, fix=True, reason=reason)
    assert character_rows(conn)[broken]["strength"] == 12
    assert conn.execute("SELECT count(*) FROM audit_runs").fetchone() == (0,)
    # when it has one: the fix is recorded with who and why, with the same transaction
    run = _audit(fix=True, actor="ops:alice", reason="legacy strength after import")
    log = conn.execute("SELECT actor, action, target, reason, count, details->>'fixed' "
                       "FROM operator_log ORDER BY id").fetchall()
    assert log == [("ops:alice", "audit.fix", f"audit_run:{run['id']}",
                    "legacy strength after import", 1, "1")]
    # and a check run is not an operator action: it logs nothing
    _audit()
    assert conn.execute("SELECT count(*) FROM operator_log").fetchone() == (1,)


def test_the_scene_xp_fix_queues_each_missing_award_once(
        conn: psycopg.Connection[Any]) -> None:
    # given finished scenes awaiting XP (one with two participants), and a clean scene
    a, b = add_character(conn), add_character(conn)
    waiting = add_scene(conn, finished=True, xp_given=False)
    empty = add_scene(conn, finished=True, xp_given=False)
    add_scene(conn, finished=True, xp_given=True)
    conn.execute("INSERT INTO scene_participants (scene_id, character_id) VALUES (%s, %s), "
                 "(%s, %s)", (waiting, b, waiting, a))
    # when the audit fixes
    run = _audit(fix=True)
    # then each scene awaiting XP got its award queued through the normal path: a job row
    # of xp.award_scene, every participant named, under a key of the run
    jobs = conn.execute("SELECT idempotency_key, params, status, source FROM job_runs "
                        "WHERE type = 'xp.award_scene' ORDER BY idempotency_key").fetchall()
    assert sorted(jobs) == sorted([
        (service.award_key(run["id"], waiting),
         {"scene_id": waiting, "awards": {str(a): True, str(b): True}}, "queued", "audit.fix"),
        (service.award_key(run["id"], empty), {"scene_id": empty, "awards": {}}, "queued",
         "audit.fix"),
    ])
    found = {f["entity_id"]: (f["outcome"], f["fixable"]) for f in _findings(run["id"])}
    assert found == {waiting: ("award_submitted", True), empty: ("award_submitted", True)}
    assert run["totals"]["scene_xp"]["award_submitted"] == 2
    # when the audit fixes again while those awards are still queued
    again = _audit(fix=True)
    # then it queues nothing twice: the scenes' awards are on their way
    assert conn.execute("SELECT count(*) FROM job_runs WHERE type = 'xp.award_scene'"
                        ).fetchone() == (2,)
    assert {f["entity_id"]: f["outcome"] for f in _findings(again["id"])} == {
        waiting: "award_pending", empty: "award_pending"}


def test_the_scene_xp_fix_retries_the_storyteller_s_own_award_not_a_wider_one(
        conn: psycopg.Connection[Any]) -> None:
    # given a scene whose storyteller awarded A and C but not B, and whose award job failed
    # (C broke a rule, since fixed)
    a, b, c = add_character(conn), add_character(conn), add_character(conn)
    scene = add_scene(conn, finished=True, xp_given=False)
    for cid in (a, b, c):
        conn.execute("INSERT INTO scene_participants (scene_id, character_id) VALUES (%s, %s)",
                     (scene, cid))
    chosen = {"scene_id": scene, "awards": {str(a): True, str(b): False, str(c): True}}
    row = conn.execute(
        "INSERT INTO job_runs (id, type, params, status, attempts, error_code, finished_at) "
        "VALUES (gen_random_uuid(), 'xp.award_scene', %s, 'failed', 1, "
        "'character_rule_violation', now()) "
        "RETURNING id", (Jsonb(chosen),)).fetchone()
    assert row is not None
    # when the audit fixes
    run = _audit(fix=True)
    # then the storyteller's job runs again, with its own awards, and no other award is queued
    jobs = conn.execute("SELECT id, params, status FROM job_runs "
                        "WHERE type = 'xp.award_scene'").fetchall()
    assert jobs == [(row[0], chosen, "queued")], jobs
    found = {f["entity_id"]: f["outcome"] for f in _findings(run["id"])}
    assert found[scene] == "award_submitted"
