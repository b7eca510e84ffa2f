"""The demo and benchmark data generator, as `warden seed` and `warden up` use it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from domain import demo, rules
from tests.conftest import ROOT, Services, _fresh_database

ID_TABLES = ("characters", "scenes", "xp_spend_requests", "weekly_xp_requests",
             "st_relationships", "xp_ledger")
# DOMAIN.md "Integrity checks", kind by kind, as the rules module spells each check.
CHARACTER_KINDS: dict[str, list[str]] = {
    "negative_xp": ["xp_nonnegative"],
    "unknown_status": ["status_known"],
    "attribute_range": [f"{a}_range" for a in rules.ATTRIBUTES],
    "ability_range": [f"{a}_range" for a in rules.ABILITIES],
    "willpower_range": ["willpower_range"],
    "temporary_willpower_range": ["temporary_willpower_range"],
    "temporary_above_willpower": ["temporary_willpower_le_willpower"],
    "age_range": ["age_range"],
    "apparent_age_range": ["apparent_age_range"],
}


@dataclass
class Batch:
    """The id each table had before a test seeded, so the test reads only its own rows."""

    db: psycopg.Connection
    floor: dict[str, int]

    def added(self) -> dict[str, int]:
        """Rows added per table since the test began."""
        counts = {t: self.scalar(f"SELECT count(*) FROM {t} WHERE id > %s", self.floor[t])
                  for t in ID_TABLES}
        counts["scene_participants"] = self.scalar(
            "SELECT count(*) FROM scene_participants WHERE scene_id > %s", self.floor["scenes"])
        return counts

    def scalar(self, sql: str, *args: object) -> int:
        row = self.db.execute(sql, args).fetchone()
        assert row is not None
        return int(row[0])

    def breaking(self, keys: list[str]) -> int:
        """New characters failing any of the rules.check_sql() checks named (NULL passes,
        as in a CHECK constraint)."""
        checks = rules.check_sql()
        broken = " OR ".join(f"NOT coalesce(({checks[k]}), true)" for k in keys)
        return self.scalar(f"SELECT count(*) FROM characters WHERE id > %s AND ({broken})",
                           self.floor["characters"])


@pytest.fixture
def batch(db: psycopg.Connection) -> Iterator[Batch]:
    """Floors before the test; afterwards its rows are deleted, so the deliberately broken
    ones cannot show up in another test's audit."""
    floor = {t: int(db.execute(f"SELECT coalesce(max(id), 0) FROM {t}").fetchone()[0])
             for t in ID_TABLES}
    yield Batch(db, floor)
    # Characters cascade to participants, requests and ledger rows; scenes and ST rows do not.
    db.execute("DELETE FROM characters WHERE id > %s", (floor["characters"],))
    db.execute("DELETE FROM scenes WHERE id > %s", (floor["scenes"],))
    db.execute("DELETE FROM st_relationships WHERE id > %s", (floor["st_relationships"],))


def _constraints(db: psycopg.Connection) -> dict[str, tuple[str, bool]]:
    rows = db.execute(
        "SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint "
        "WHERE conrelid IN ('characters'::regclass, 'scenes'::regclass) AND contype = 'c'"
    ).fetchall()
    return {name: (definition, valid) for name, definition, valid in rows}


def test_seed_reports_the_rows_it_adds(batch: Batch) -> None:
    # given a database that may already hold data
    # when 300 characters are seeded with 5% violations
    counts = demo.seed(300, violations=0.05, rng_seed=1)
    # then each table's count is the rows it gained
    assert {t: counts[t] for t in demo.TABLES} == batch.added()
    assert counts["characters"] == 300
    assert all(counts[t] > 0 for t in demo.TABLES)
    # and 5% of the characters (15) break each character rule, and nothing else does
    for kind, keys in CHARACTER_KINDS.items():
        assert counts[f"violations.{kind}"] == 15 == batch.breaking(keys), kind
    # and 5% of the 75 scenes (4) carry each scene flag finding
    awaiting = batch.scalar("SELECT count(*) FROM scenes WHERE id > %s AND finished "
                            "AND NOT xp_given", batch.floor["scenes"])
    unfinished = batch.scalar("SELECT count(*) FROM scenes WHERE id > %s AND xp_given "
                              "AND NOT finished", batch.floor["scenes"])
    assert counts["violations.scenes_awaiting_xp"] == awaiting == 4
    assert counts["violations.xp_given_unfinished"] == unfinished == 4
    # and the duplicate ST rows are the ones the audit's fix would delete
    dups = batch.scalar(
        "SELECT count(*) - count(DISTINCT (user_id, chronicle_id, gameline)) "
        "FROM st_relationships WHERE id > %s", batch.floor["st_relationships"])
    assert counts["violations.duplicate_st_relationships"] == dups >= 1


def test_violation_kinds_cover_every_rule() -> None:
    # given the rules' CHECK expressions
    # then every one of them is broken by some character violation kind, exactly once
    keys = [k for ks in demo.CHARACTER_VIOLATIONS.values() for k in ks]
    assert sorted(keys) == sorted(rules.check_sql())
    assert set(demo.CHARACTER_VIOLATIONS) == set(CHARACTER_KINDS)


def test_clean_seed_breaks_no_rule(batch: Batch) -> None:
    # when a batch is seeded with no violations
    counts = demo.seed(300, violations=0)
    # then no violation is reported
    assert all(v == 0 for k, v in counts.items() if k.startswith("violations."))
    # and no new character breaks any rule of rules.check_sql()
    assert batch.breaking(list(rules.check_sql())) == 0
    # and there are no duplicate ST triples and no scene flag findings
    assert batch.scalar(
        "SELECT count(*) - count(DISTINCT (user_id, chronicle_id, gameline)) "
        "FROM st_relationships WHERE id > %s", batch.floor["st_relationships"]) == 0
    assert batch.scalar("SELECT count(*) FROM scenes WHERE id > %s AND finished <> xp_given",
                        batch.floor["scenes"]) == 0
    # and the data looks like the domain: every status and every spend state occurs
    statuses = {r[0] for r in batch.db.execute(
        "SELECT DISTINCT status FROM characters WHERE id > %s", (batch.floor["characters"],))}
    assert statuses == set(rules.STATUSES)
    states = {r[0] for r in batch.db.execute(
        "SELECT DISTINCT state FROM xp_spend_requests WHERE id > %s",
        (batch.floor["xp_spend_requests"],))}
    assert states == set(rules.SPEND_STATES)
    # and ages are sometimes unknown, temporary willpower sometimes below permanent
    assert batch.scalar("SELECT count(*) FROM characters WHERE id > %s AND age IS NULL",
                        batch.floor["characters"]) > 0
    assert batch.scalar("SELECT count(*) FROM characters WHERE id > %s "
                        "AND temporary_willpower < willpower", batch.floor["characters"]) > 0


def test_relations_hold_together(batch: Batch) -> None:
    # when a batch is seeded
    demo.seed(300, violations=0.05)
    since = batch.floor
    # then every participant belongs to its scene's chronicle
    assert batch.scalar(
        "SELECT count(*) FROM scene_participants p JOIN scenes s ON s.id = p.scene_id "
        "JOIN characters c ON c.id = p.character_id "
        "WHERE s.id > %s AND s.chronicle_id <> c.chronicle_id", since["scenes"]) == 0
    # and every weekly claim names a scene its character played in
    named = " UNION ALL ".join(
        f"SELECT character_id, {c}_scene_id AS scene_id FROM weekly_xp_requests "
        f"WHERE id > %s AND {c}" for c in rules.WEEKLY_NEEDS_SCENE)
    assert batch.scalar(
        f"SELECT count(*) FROM ({named}) w WHERE NOT EXISTS (SELECT 1 FROM scene_participants p "
        "WHERE p.character_id = w.character_id AND p.scene_id = w.scene_id)",
        *[since["weekly_xp_requests"]] * len(rules.WEEKLY_NEEDS_SCENE)) == 0
    assert batch.scalar(f"SELECT count(*) FROM ({named}) w",
                        *[since["weekly_xp_requests"]] * len(rules.WEEKLY_NEEDS_SCENE)) > 0
    # and a decided request names who decided it, a pending one does not
    assert batch.scalar(
        "SELECT count(*) FROM xp_spend_requests WHERE id > %s "
        "AND (state = 'Pending') <> (decided_by IS NULL)", since["xp_spend_requests"]) == 0
    # and each character's ledger sums to its XP
    assert batch.scalar(
        "SELECT count(*) FROM characters c WHERE id > %s AND xp <> "
        "(SELECT coalesce(sum(delta), 0) FROM xp_ledger l WHERE l.character_id = c.id)",
        since["characters"]) == 0
    # and every award of an awarded scene went to one of its participants
    assert batch.scalar(
        "SELECT count(*) FROM xp_ledger l JOIN scenes s ON s.id = l.scene_id "
        "WHERE l.id > %s AND (NOT s.xp_given OR NOT EXISTS (SELECT 1 FROM scene_participants p "
        "WHERE p.scene_id = s.id AND p.character_id = l.character_id))",
        since["xp_ledger"]) == 0


def test_violating_seed_keeps_constraints_enforced(batch: Batch) -> None:
    # given the rule constraints as the migration made them
    before = _constraints(batch.db)
    rule_names = {f"ck_characters_{k}" for k in rules.check_sql()} | {
        demo.SCENE_FLAG_CONSTRAINT}
    assert rule_names <= set(before)
    # when a batch with violations is seeded
    demo.seed(200, violations=0.05)
    # then violation rows exist for every character rule kind
    for kind, keys in CHARACTER_KINDS.items():
        assert batch.breaking(keys) > 0, kind
    # and the constraints are back, same names and definitions, still NOT VALID
    assert _constraints(batch.db) == before
    assert not any(before[name][1] for name in rule_names)
    # and new writes that break them are still refused
    with pytest.raises(psycopg.errors.CheckViolation):
        batch.db.execute("INSERT INTO characters (name, owner_id, chronicle_id, xp) "
                         "VALUES ('New', 1, 1, -1)")
    valid = batch.db.execute(
        "SELECT id FROM characters WHERE id > %s AND xp > 0 LIMIT 1",
        (batch.floor["characters"],)).fetchone()
    assert valid is not None
    with pytest.raises(psycopg.errors.CheckViolation):
        batch.db.execute("UPDATE characters SET xp = -1 WHERE id = %s", valid)
    with pytest.raises(psycopg.errors.CheckViolation):
        batch.db.execute("UPDATE scenes SET finished = false, xp_given = true "
                         "WHERE id = (SELECT max(id) FROM scenes)")


def test_seeding_twice_appends(batch: Batch) -> None:
    # given one clean batch
    first = demo.seed(120, violations=0)
    after_first = batch.added()
    boundary = batch.scalar("SELECT max(id) FROM characters")
    # when a second, identical batch is seeded
    second = demo.seed(120, violations=0)
    # then both batches' rows are there, none overwritten
    assert batch.added() == {t: first[t] + second[t] for t in after_first}
    # and the batches share no chronicle, so the second adds no duplicate ST triple
    shared = batch.scalar(
        "SELECT count(*) FROM (SELECT chronicle_id FROM characters WHERE id > %s "
        "GROUP BY chronicle_id HAVING count(DISTINCT (id > %s)) > 1) x",
        batch.floor["characters"], boundary)
    assert shared == 0
    assert batch.scalar(
        "SELECT count(*) - count(DISTINCT (user_id, chronicle_id, gameline)) "
        "FROM st_relationships WHERE id > %s", batch.floor["st_relationships"]) == 0


def test_legacy_spend_history_has_both_shapes(batch: Batch) -> None:
    # when a batch is seeded
    demo.seed(300, violations=0)
    # then some characters carry spent_xp entries of both legacy shapes
    rows = batch.db.execute(
        "SELECT id, e FROM characters, jsonb_array_elements(spent_xp) e WHERE id > %s",
        (batch.floor["characters"],)).fetchall()
    newer = [e for _, e in rows if isinstance(e["index"], int)]
    older = [(cid, e) for cid, e in rows if isinstance(e["index"], str)]
    assert newer and older
    for e in newer:
        assert {"index", "trait", "value", "cost", "category", "approved",
                "timestamp"} <= set(e) <= {"index", "trait", "value", "cost", "category",
                                           "approved", "timestamp", "approved_at"}
        assert e["value"] in rules.TRAIT_RANGES and e["category"] in rules.TRAIT_TYPES
        assert ("approved_at" in e) == (e["approved"] != "Pending")
    for cid, e in older:
        assert set(e) == {"index", "trait", "value", "cost", "approved"}
        match = re.fullmatch(r"(\d+)_(attribute|ability)_([a-z]+)_(\d+)", e["index"])
        assert match is not None, e
        assert int(match[1]) == cid and int(match[4]) == e["value"]
        assert match[3] in rules.TRAIT_RANGES and isinstance(e["value"], int)
    assert {e["approved"] for _, e in rows} == set(rules.SPEND_STATES)


def test_same_seed_same_characters(batch: Batch) -> None:
    # given the traits a batch's characters get, in id order
    cols = ", ".join(("name", "status", "xp", "npc", "concept", "spent_xp IS NULL",
                      *rules.TRAIT_RANGES, *rules.NULLABLE_RANGES))

    def traits(since: int, until: int | None = None) -> list[tuple[object, ...]]:
        return batch.db.execute(f"SELECT {cols} FROM characters WHERE id > %s "
                                "AND id <= coalesce(%s, id) ORDER BY id", (since, until)).fetchall()

    # when the same seed runs twice, then once with another seed
    start = batch.floor["characters"]
    demo.seed(60, violations=0.05, rng_seed=7)
    mid = batch.scalar("SELECT max(id) FROM characters")
    demo.seed(60, violations=0.05, rng_seed=7)
    end = batch.scalar("SELECT max(id) FROM characters")
    demo.seed(60, violations=0.05, rng_seed=8)
    # then the two runs of seed 7 made the same characters, and seed 8 others
    assert traits(start, mid) == traits(mid, end)
    assert traits(mid, end) != traits(end)


def test_zero_characters_adds_nothing(batch: Batch) -> None:
    # when nothing is asked for
    counts = demo.seed(0)
    # then nothing is added and every count is zero
    assert set(counts.values()) == {0}
    assert set(batch.added().values()) == {0}


def test_cli_seed_prints_the_counts(services: Services, batch: Batch) -> None:
    # when an operator runs `warden seed`
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "seed", "--characters", "40", "--violations", "0"],
        env=services.env(), cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    # then it exits 0 and prints the counts as JSON, with the time taken
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    assert printed["characters"] == 40 == batch.added()["characters"]
    assert "seconds" in printed


@pytest.fixture
def empty_database(services: Services) -> Iterator[str]:
    """A migrated database with no data, current for this test only."""
    from workers.db import reset_engine
    from workers.migrate import upgrade
    from workers.settings import get_settings

    url, admin = _fresh_database(services.database_url)
    upgrade(url=url)
    previous = os.environ["WARDEN_DATABASE_URL"]

    def use(database_url: str) -> None:
        os.environ["WARDEN_DATABASE_URL"] = database_url
        get_settings.cache_clear()
        reset_engine()

    use(url)
    try:
        yield url
    finally:
        use(previous)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def test_demo_loads_once_into_an_empty_database(empty_database: str) -> None:
    # given a database without characters
    # when `warden up` asks for the demo data
    loaded = demo.seed_demo_if_empty()
    # then the small demo set is there, with violations for the audit to find
    assert loaded is not None
    assert loaded["characters"] == demo.DEMO_CHARACTERS
    assert all(loaded[f"violations.{kind}"] > 0 for kind in demo.VIOLATION_KINDS)
    with psycopg.connect(empty_database) as conn:
        assert conn.execute("SELECT count(*) FROM characters").fetchone() == (
            demo.DEMO_CHARACTERS,)
    # and asking again loads nothing more
    assert demo.seed_demo_if_empty() is None
