"""The schema: migrations, rule constraints (NOT VALID), and the updated_at trigger."""

from __future__ import annotations

import time

import psycopg
import pytest

from domain import rules


def _norm(expr: str) -> str:
    return "".join(ch for ch in expr.lower() if ch.isalnum())


def test_character_constraints_match_the_rules_module(db: psycopg.Connection) -> None:
    # given the live database's CHECK constraints on characters
    rows = db.execute(
        "SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint "
        "WHERE conrelid = 'characters'::regclass AND contype = 'c'"
    ).fetchall()
    live = {name.removeprefix("ck_characters_"): (defn, valid) for name, defn, valid in rows}
    # then every rule has its constraint, NOT VALID, with the rule's bounds
    for name, expr in rules.check_sql().items():
        assert name in live, f"rule {name} has no constraint: write a migration"
        defn, validated = live[name]
        assert validated is False, f"{name} should be NOT VALID (legacy rows are the audit's)"
        for number in [t for t in expr.replace("(", " ").split() if t.isdigit()]:
            assert number in defn, f"{name}: {defn} does not carry bound {number} of {expr}"
    assert set(live) == set(rules.check_sql())


def test_new_writes_must_obey_the_rules(db: psycopg.Connection) -> None:
    db.execute("INSERT INTO characters (name, owner_id, chronicle_id) VALUES ('ok', 1, 1)")
    for bad in ("xp = -1", "status = 'Zz'", "strength = 11", "brawl = -1",
                "temporary_willpower = 9, willpower = 2", "age = 501"):
        with pytest.raises(psycopg.errors.CheckViolation):
            db.execute(f"UPDATE characters SET {bad} WHERE name = 'ok'")


def test_updated_at_is_bumped_on_every_update(db: psycopg.Connection) -> None:
    row = db.execute(
        "INSERT INTO characters (name, owner_id, chronicle_id) VALUES ('t', 1, 1) "
        "RETURNING id, updated_at"
    ).fetchone()
    assert row is not None
    time.sleep(0.01)
    after = db.execute("UPDATE characters SET xp = 3 WHERE id = %s RETURNING updated_at",
                       (row[0],)).fetchone()
    assert after is not None
    assert after[0] > row[1]


def test_migrations_downgrade_and_upgrade_cleanly(services: object) -> None:
    # given a fresh database at head; when downgraded to base and upgraded again; no error
    import psycopg as pg

    from tests.conftest import _fresh_database
    from workers.migrate import downgrade, upgrade

    url = services.database_url  # type: ignore[attr-defined]
    fresh, admin = _fresh_database(url)
    try:
        upgrade(url=fresh)
        downgrade("base", url=fresh)
        upgrade(url=fresh)
        with pg.connect(fresh) as conn:
            assert conn.execute("SELECT count(*) FROM job_runs").fetchone() == (0,)
    finally:
        with pg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{fresh.rsplit("/", 1)[1]}" WITH (FORCE)')


def test_violation_indexes_are_built_for_the_current_rules(services: object) -> None:
    # the audit reads offenders from these partial indexes only while their predicate is
    # domain.checks' current one; a change of the rules needs a migration rebuilding them
    from domain import checks
    from tasks.audits.service import violation_index_ready
    from workers.db import session_scope

    with session_scope() as s:
        for ix in checks.VIOLATION_INDEXES.values():
            assert violation_index_ready(s, ix), (
                f"{ix.name} was built for other rules: write a migration that rebuilds it "
                f"with domain.checks.VIOLATION_INDEXES[{ix.table!r}] and comments it {ix.tag}")
