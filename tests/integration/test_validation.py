"""Character validation as the service runs it: every rule per character plus the
cross-row rules, issues with a lifecycle, incremental sweeps by watermark, the Redis
verdict cache (row version, rules version) and chunking by id range."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from sqlalchemy import text

from domain import rules
from tasks.validation import service
from tests.conftest import Services
from tests.integration.test_audit_helpers import (
    Isolated,
    add_character,
    constraints_off,
    isolated,
    wipe,
)
from workers.db import session_scope

TTL = 3600


@pytest.fixture(scope="module")
def iso(services: Services) -> Iterator[Isolated]:
    with isolated(services) as found:
        yield found


@pytest.fixture
def conn(iso: Isolated, rds: redis.Redis) -> Iterator[psycopg.Connection[Any]]:
    with iso.connect() as c:
        wipe(c)
        for k in rds.scan_iter(f"{iso.prefix}*"):
            rds.delete(k)
        yield c


def sweep(mode: str = "full", *, ids: list[int] | None = None, overlap: float = 300,
          version: str | None = None) -> dict[str, Any]:
    """One sweep run inline, as validation.characters runs a small one; its stored row."""
    v = version or rules.rules_version()
    with session_scope() as s:
        sw, created = service.start_sweep(s, job_id=None, mode=mode, character_ids=ids,
                                          rules_version=v, chunk_size=10_000, overlap=overlap)
        assert created and sw.plan == "inline"
        stored, done = service.sweep_inline(s, sw, v, overlap)
    service.remember(done.verdicts, v, TTL)
    return stored


def _issues(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT id, character_id, rule, subject, severity, first_seen, last_seen, resolved_at "
        "FROM validation_issues ORDER BY id").fetchall()


def _spend(conn: psycopg.Connection[Any], character_id: int, trait: str, value: int,
           cost: int) -> int:
    row = conn.execute(
        "INSERT INTO xp_spend_requests (character_id, trait_name, trait_type, trait_value, "
        "cost, state) VALUES (%s, %s, %s, %s, %s, 'Pending') RETURNING id",
        (character_id, trait, rules.trait_type(trait), value, cost)).fetchone()
    assert row is not None
    return int(row[0])


def _crafted(conn: psycopg.Connection[Any]) -> dict[str, int]:
    ids = {}
    with constraints_off(conn):
        ids["strength"] = add_character(conn, strength=12)
        ids["age"] = add_character(conn, age=900)
    ids["ledger"] = add_character(conn, xp=10)
    conn.execute("INSERT INTO xp_ledger (character_id, delta, kind) VALUES (%s, -3, 'spend')",
                 (ids["ledger"],))
    ids["spender"] = add_character(conn, xp=5)
    ids["luck"] = _spend(conn, ids["spender"], "luck", 3, 5)
    ids["too_high"] = _spend(conn, ids["spender"], "strength", 11, 40)
    ids["fine"] = _spend(conn, ids["spender"], "brawl", 2, 2)
    ids["clean"] = add_character(conn, xp=3)
    return ids


def test_a_full_sweep_reports_every_broken_rule_of_every_character(
        conn: psycopg.Connection[Any]) -> None:
    # given characters breaking a range, an age (a warning), the ledger, and spend rules
    ids = _crafted(conn)
    # when a full sweep runs
    stored = sweep("full")
    # then each broken rule of each character is an open issue, with its severity
    assert {(r[1], r[2], r[3], r[4]) for r in _issues(conn)} == {
        (ids["strength"], "strength_range", "strength", "error"),
        (ids["age"], "age_range", "age", "warning"),
        (ids["ledger"], "xp_matches_ledger", "xp", "error"),
        (ids["spender"], "spend_trait_known", f"xp_spend_request:{ids['luck']}", "error"),
        (ids["spender"], "spend_value_in_range", f"xp_spend_request:{ids['too_high']}",
         "error"),
    }
    # and the sweep's recorded counts say so
    totals = stored["totals"]
    assert (totals["candidates"], totals["validated"], totals["cache_hits"]) == (5, 5, 0)
    assert totals["issues"] == {"error": 4, "warning": 1}
    assert (totals["opened"], totals["resolved"]) == (5, 0)
    assert totals["open_issues"] == {"error": 4, "warning": 1}
    assert stored["status"] == "succeeded"


def test_issues_have_a_lifecycle_new_persisting_fixed(conn: psycopg.Connection[Any]) -> None:
    # given a first sweep's issues
    ids = _crafted(conn)
    sweep("full")
    first = {r[0]: r for r in _issues(conn)}
    assert all(r[5] == r[6] and r[7] is None for r in first.values())  # new: first = last
    # when a second sweep runs with nothing changed
    second = sweep("full")
    # then the same issues persist: same rows, first_seen kept, last_seen moved on
    again = {r[0]: r for r in _issues(conn)}
    assert set(again) == set(first)
    assert all(again[i][5] == first[i][5] and again[i][6] > first[i][6] for i in first)
    assert (second["totals"]["opened"], second["totals"]["resolved"]) == (0, 0)
    # when the broken strength is fixed and a sweep runs
    conn.execute("UPDATE characters SET strength = 5 WHERE id = %s", (ids["strength"],))
    third = sweep("full")
    # then that issue is resolved (kept, with resolved_at), the others still open
    now = {r[0]: r for r in _issues(conn)}
    fixed = [r for r in now.values() if r[7] is not None]
    assert [(r[1], r[2]) for r in fixed] == [(ids["strength"], "strength_range")]
    assert (third["totals"]["opened"], third["totals"]["resolved"]) == (0, 1)
    # when it breaks again, it is a new issue; the old one stays in the history
    with constraints_off(conn):
        conn.execute("UPDATE characters SET strength = 13 WHERE id = %s", (ids["strength"],))
    fourth = sweep("full")
    rows = [r for r in _issues(conn) if r[2] == "strength_range"]
    assert [(r[7] is None) for r in rows] == [False, True]
    assert rows[1][5] > rows[0][7]  # first seen after the old one was resolved
    assert fourth["totals"]["opened"] == 1


def test_incremental_revalidates_only_the_changed_character(
        conn: psycopg.Connection[Any]) -> None:
    # given a full sweep over five characters (which caches its verdicts)
    ids = _crafted(conn)
    sweep("full")
    # when one character changes and an incremental sweep runs
    conn.execute("UPDATE characters SET name = 'renamed' WHERE id = %s", (ids["clean"],))
    inc = sweep("incremental")
    # then the watermark's overlap reads the five again, the cache skips the four unchanged,
    # and the changed one alone is validated (the sweep's recorded counts)
    t = inc["totals"]
    assert (t["candidates"], t["cache_hits"], t["validated"]) == (5, 4, 1)
    assert inc["since"] is not None
    # when nothing changed since: every candidate is a cache hit, no work is done
    idle = sweep("incremental")
    t = idle["totals"]
    assert (t["candidates"], t["cache_hits"], t["validated"]) == (5, 5, 0)
    # and without the overlap, the watermark alone selects only what changed after it
    conn.execute("UPDATE characters SET name = 'again' WHERE id = %s", (ids["ledger"],))
    strict = sweep("incremental", overlap=0)
    t = strict["totals"]
    assert (t["candidates"], t["cache_hits"], t["validated"]) == (1, 0, 1)
    # the issues are those of the full sweep: nothing was lost by skipping
    assert t["open_issues"] == {"error": 4, "warning": 1}


def test_a_rules_version_change_revalidates_everything(conn: psycopg.Connection[Any]) -> None:
    # given a full sweep and an incremental one, all cached
    _crafted(conn)
    sweep("full")
    assert sweep("incremental")["totals"]["validated"] == 0
    # when the rules change (domain.rules.rules_version() moves with any rule constant)
    changed = sweep("incremental", version="edited-rules")
    # then no watermark and no cached verdict holds: every character is validated again
    t = changed["totals"]
    assert changed["since"] is None
    assert (t["candidates"], t["cache_hits"], t["validated"]) == (5, 0, 5)
    # and the next incremental under the new rules is cheap again
    assert sweep("incremental", version="edited-rules")["totals"]["validated"] == 0


def test_named_characters_are_validated_without_moving_the_watermark(
        conn: psycopg.Connection[Any]) -> None:
    ids = _crafted(conn)
    sweep("full")
    named = sweep("full", ids=[ids["strength"], ids["clean"]])
    assert (named["totals"]["candidates"], named["totals"]["validated"]) == (2, 2)
    with session_scope() as s:
        last = s.execute(text(
            "SELECT max(id) FROM validation_sweeps WHERE character_ids IS NULL "
            "AND status = 'succeeded'")).scalar_one()
    assert last != named["id"]


def test_chunks_by_id_range_add_up_to_the_whole(conn: psycopg.Connection[Any]) -> None:
    # given the five characters, and a sweep planned in chunks of two
    _crafted(conn)
    v = rules.rules_version()
    with session_scope() as s:
        sw, _ = service.start_sweep(s, job_id=None, mode="full", character_ids=None,
                                    rules_version=v, chunk_size=2, overlap=0)
        assert sw.plan == "fanout"
        chunks = service.plan_chunks(s, sw, 2)
    # when each chunk is validated on its own
    parts = []
    for c in chunks:
        with session_scope() as s:
            parts.append(service.validate_chunk(
                s, sweep_id=sw.id, rules_version=v, use_cache=False, id_from=c["id_from"],
                id_to=c["id_to"]).as_dict())
    # then the chunks cover every character once, and their sum is a whole sweep's
    assert [c["id_to"] is None for c in chunks] == [False, False, True]
    total = service.add_totals(parts)
    assert (total["candidates"], total["validated"]) == (5, 5)
    assert total["issues"] == {"error": 4, "warning": 1}
    assert total["opened"] == 5


def test_a_sweep_is_found_again_by_its_job(conn: psycopg.Connection[Any]) -> None:
    # given a sweep started for a job (a fanned-out parent's body runs again once its
    # children end)
    ids = _crafted(conn)
    job = "5d1f1c3e-8e0a-4a51-9a57-0f3f5c0e0001"
    v = rules.rules_version()
    with session_scope() as s:
        first, created = service.start_sweep(s, job_id=job, mode="incremental",
                                             character_ids=None, rules_version=v,
                                             chunk_size=2, overlap=0)
    # when the same job starts it again, after characters changed
    conn.execute("UPDATE characters SET name = 'x' WHERE id = %s", (ids["clean"],))
    with session_scope() as s:
        again, created_again = service.start_sweep(s, job_id=job, mode="incremental",
                                                   character_ids=None, rules_version=v,
                                                   chunk_size=10_000, overlap=0)
    # then it is the same sweep, with the plan and watermark of its first run
    assert (created, created_again) == (True, False)
    assert again == first and again.plan == "fanout"
    assert conn.execute("SELECT count(*) FROM validation_sweeps").fetchone() == (1,)


def test_a_full_sweep_caches_only_what_an_incremental_sweep_reads_again(
        conn: psycopg.Connection[Any], rds: redis.Redis, iso: Isolated) -> None:
    # given a character last written a day ago, and one written just now
    old = add_character(conn, updated_at="2020-01-01T00:00:00Z")
    new = add_character(conn)
    # when a full sweep runs with a 60 s overlap
    v = rules.rules_version()
    sweep("full", overlap=60)
    # then only the fresh one's verdict is cached: the old one is outside every later
    # incremental sweep's window, so its entry would never be read
    cached = {k.rsplit(":", 1)[1] for k in rds.scan_iter(f"{iso.prefix}warden:validation:{v}:*")}
    assert cached == {str(new)}
    # and the next incremental sweep reads the fresh one only, from the cache
    t = sweep("incremental", overlap=60)["totals"]
    assert (t["candidates"], t["cache_hits"], t["validated"]) == (1, 1, 0)
    del old
