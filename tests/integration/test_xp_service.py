"""The XP flows against real Postgres: each one transaction, exactly once, always in the ledger."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from domain import rules
from domain.errors import (
    AlreadyProcessed,
    CharacterRuleViolation,
    InsufficientXp,
    InvalidRequest,
    NotAParticipant,
    OutOfOrder,
    XpAlreadyGiven,
)
from tasks.xp import service
from tests.integration.test_audit_helpers import constraints_off
from workers.db import session_scope


def _character(db: psycopg.Connection, xp: int = 0, **traits: int) -> int:
    """A character with an opening ledger row for its xp, as every character has."""
    cols = ", ".join(["name", "owner_id", "chronicle_id", "xp", *traits])
    vals = ", ".join(["%s"] * (4 + len(traits)))
    row = db.execute(f"INSERT INTO characters ({cols}) VALUES ({vals}) RETURNING id",
                     ("xp-test", 1, 7, xp, *traits.values())).fetchone()
    assert row is not None
    if xp:
        db.execute("INSERT INTO xp_ledger (character_id, delta, kind, reason) "
                   "VALUES (%s, %s, 'adjust', 'opening balance: test')", (row[0], xp))
    return int(row[0])


def _scene(db: psycopg.Connection, participants: list[int], *, finished: bool = True) -> int:
    row = db.execute("INSERT INTO scenes (chronicle_id, name, finished) VALUES (7, 's', %s) "
                     "RETURNING id", (finished,)).fetchone()
    assert row is not None
    for cid in participants:
        db.execute("INSERT INTO scene_participants VALUES (%s, %s)", (row[0], cid))
    return int(row[0])


def _xp(db: psycopg.Connection, cid: int) -> tuple[int, int]:
    """(characters.xp, the ledger's sum) of one character."""
    row = db.execute("SELECT c.xp, (SELECT coalesce(sum(delta), 0) FROM xp_ledger "
                     "WHERE character_id = c.id) FROM characters c WHERE c.id = %s",
                     (cid,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    with session_scope() as s:
        return fn(s, *args, **kwargs)


def test_scene_award_gives_xp_once_and_a_repeat_is_xp_already_given(
        db: psycopg.Connection) -> None:
    # given a finished scene with three participants, two of them earning XP
    a, b, c = _character(db, 3), _character(db), _character(db, 1)
    scene = _scene(db, [a, b, c])
    job = uuid.uuid4()
    # when the award runs
    result = _run(service.award_scene, scene, {a: True, b: True, c: False}, job_id=job)
    # then each winner got the scene's XP, in the ledger with the job id, and the flag is set
    assert result.as_dict() == {"scene_id": scene, "awarded": [a, b],
                                "xp_each": rules.SCENE_AWARD_XP}
    assert _xp(db, a) == (3 + rules.SCENE_AWARD_XP,) * 2
    assert _xp(db, b) == (rules.SCENE_AWARD_XP,) * 2
    assert _xp(db, c) == (1, 1)
    rows = db.execute("SELECT character_id, kind, job_id FROM xp_ledger WHERE scene_id = %s "
                      "ORDER BY character_id", (scene,)).fetchall()
    assert rows == [(a, "award", job), (b, "award", job)]
    assert db.execute("SELECT xp_given FROM scenes WHERE id = %s", (scene,)).fetchone() == (True,)
    # when it runs again, then it fails cleanly and nothing changes
    with pytest.raises(XpAlreadyGiven) as err:
        _run(service.award_scene, scene, {a: True, b: True})
    assert err.value.code == "xp_already_given"
    assert _xp(db, a) == (3 + rules.SCENE_AWARD_XP,) * 2


def test_award_to_a_stranger_is_an_error_and_changes_nothing(db: psycopg.Connection) -> None:
    # given a scene and a character who did not play in it
    a, stranger = _character(db), _character(db)
    scene = _scene(db, [a])
    # when the award names the stranger, then not_a_participant, and no XP moved at all
    with pytest.raises(NotAParticipant) as err:
        _run(service.award_scene, scene, {a: True, stranger: True})
    assert err.value.code == "not_a_participant"
    assert str(stranger) in str(err.value)
    assert _xp(db, a) == (0, 0)
    assert db.execute("SELECT xp_given FROM scenes WHERE id = %s", (scene,)).fetchone() == (False,)


def test_award_of_an_unknown_or_unfinished_scene_is_invalid_request(
        db: psycopg.Connection) -> None:
    a = _character(db)
    unfinished = _scene(db, [a], finished=False)
    for scene in (unfinished, 10**12):
        with pytest.raises(InvalidRequest):
            _run(service.award_scene, scene, {a: True})
    assert _xp(db, a) == (0, 0)


def test_spend_deducts_now_files_pending_and_checks_the_next_dot(db: psycopg.Connection) -> None:
    # given a character with 15 XP and strength 2
    cid = _character(db, 15, strength=2)
    # when it spends on strength 3, then the rules' cost is deducted and a Pending request filed
    cost = rules.xp_cost("attribute", 3)
    spent = _run(service.spend, cid, "strength", 3)
    assert (spent.cost, spent.xp_left) == (cost, 15 - cost)
    assert _xp(db, cid) == (15 - cost, 15 - cost)
    req = db.execute("SELECT state, trait_type, trait_value, cost FROM xp_spend_requests "
                     "WHERE id = %s", (spent.request_id,)).fetchone()
    assert req == ("Pending", "attribute", 3, cost)
    # when it asks for strength 3 again, then only 4 is next (3 is pending)
    with pytest.raises(InvalidRequest, match="raised to 4"):
        _run(service.spend, cid, "strength", 3)
    # when it cannot pay for the next dot, then insufficient_xp and nothing changed
    with pytest.raises(InsufficientXp) as err:
        _run(service.spend, cid, "strength", 4)
    assert err.value.code == "insufficient_xp"
    assert _xp(db, cid) == (15 - cost, 15 - cost)


def test_approve_raises_the_trait_once(db: psycopg.Connection) -> None:
    # given a pending request for brawl 1 (a new ability)
    cid = _character(db, 10)
    spent = _run(service.spend, cid, "brawl", 1)
    assert spent.cost == rules.XP_NEW_ABILITY_COST
    # when it is approved, then the trait is set and XP is unchanged (paid at the spend)
    done = _run(service.approve_spend, spent.request_id, 99)
    assert (done.state, done.refunded, done.xp) == ("Approved", 0, 10 - spent.cost)
    row = db.execute("SELECT c.brawl, r.state, r.decided_by, r.decided_at IS NOT NULL "
                     "FROM characters c JOIN xp_spend_requests r ON r.character_id = c.id "
                     "WHERE r.id = %s", (spent.request_id,)).fetchone()
    assert row == (1, "Approved", 99, True)
    # when it is approved or denied again, then already_processed and no refund
    for again in (service.approve_spend, service.deny_spend):
        with pytest.raises(AlreadyProcessed):
            _run(again, spent.request_id, 99)
    assert _xp(db, cid) == (10 - spent.cost, 10 - spent.cost)


def test_deny_refunds_the_cost_in_the_ledger(db: psycopg.Connection) -> None:
    cid = _character(db, 10)
    spent = _run(service.spend, cid, "willpower", 4)  # default willpower 3
    done = _run(service.deny_spend, spent.request_id, 5)
    assert (done.state, done.refunded, done.xp) == ("Denied", spent.cost, 10)
    assert _xp(db, cid) == (10, 10)
    kinds = db.execute("SELECT kind, delta FROM xp_ledger WHERE spend_request_id = %s "
                       "ORDER BY id", (spent.request_id,)).fetchall()
    assert kinds == [("spend", -spent.cost), ("refund", spent.cost)]
    with pytest.raises(InvalidRequest):
        _run(service.deny_spend, 10**12, 5)


def _held(db: psycopg.Connection, cid: int, trait: str) -> int:
    row = db.execute(f"SELECT {trait} FROM characters WHERE id = %s", (cid,)).fetchone()
    assert row is not None
    return int(row[0])


def _states(db: psycopg.Connection, *ids: int) -> list[str]:
    return [db.execute("SELECT state FROM xp_spend_requests WHERE id = %s",
                       (i,)).fetchone()[0] for i in ids]  # type: ignore[index]


def test_deny_the_lower_dot_then_approve_the_higher_buys_nothing_for_free(
        db: psycopg.Connection) -> None:
    # given strength 2, 100 XP, and two stacked pending dots: 3 (8 XP) and 4 (12 XP)
    cid = _character(db, 100, strength=2)
    three = _run(service.spend, cid, "strength", 3)
    four = _run(service.spend, cid, "strength", 4)
    assert (three.cost, four.cost) == (rules.xp_cost("attribute", 3),
                                       rules.xp_cost("attribute", 4))
    # when the storyteller denies the 3 (review N7), then approves the 4
    denied = _run(service.deny_spend, three.request_id, 7)
    with pytest.raises(AlreadyProcessed):
        _run(service.approve_spend, four.request_id, 7)
    # then strength is still 2 and all 20 XP are back: the 4, priced on top of the 3,
    # was denied and refunded with it (before the fix: strength 4 for 12 XP)
    assert (_held(db, cid, "strength"), _xp(db, cid)) == (2, (100, 100))
    assert _states(db, three.request_id, four.request_id) == ["Denied", "Denied"]
    assert (denied.refunded, denied.xp, denied.also_denied) == (
        three.cost + four.cost, 100, [four.request_id])
    refunds = db.execute("SELECT spend_request_id, delta FROM xp_ledger WHERE character_id = %s "
                         "AND kind = 'refund' ORDER BY spend_request_id", (cid,)).fetchall()
    assert refunds == [(three.request_id, three.cost), (four.request_id, four.cost)]
    # and the 3 can be bought again, at its price
    again = _run(service.spend, cid, "strength", 3)
    assert again.cost == three.cost


def test_approve_the_higher_dot_first_is_refused_until_the_dot_below_is_held(
        db: psycopg.Connection) -> None:
    # given strength 2, 100 XP, pending dots 3 and 4
    cid = _character(db, 100, strength=2)
    three = _run(service.spend, cid, "strength", 3)
    four = _run(service.spend, cid, "strength", 4)
    # when the 4 is approved first, then out_of_order, naming the request to approve first;
    # strength and both requests stay as they were
    with pytest.raises(OutOfOrder) as err:
        _run(service.approve_spend, four.request_id, 7)
    assert err.value.code == "out_of_order"
    assert f"approve request {three.request_id}" in str(err.value)
    assert _held(db, cid, "strength") == 2
    assert _states(db, three.request_id, four.request_id) == ["Pending", "Pending"]
    # when the 3 is then denied, then the 4 goes with it: no dot held, nothing paid
    _run(service.deny_spend, three.request_id, 7)
    assert _held(db, cid, "strength") == 2
    assert _xp(db, cid) == (100, 100)
    # and in order, both dots are held for the price of both
    three = _run(service.spend, cid, "strength", 3)
    four = _run(service.spend, cid, "strength", 4)
    _run(service.approve_spend, three.request_id, 7)
    _run(service.approve_spend, four.request_id, 7)
    assert _held(db, cid, "strength") == 4
    assert _xp(db, cid) == (100 - three.cost - four.cost,) * 2


def test_denying_the_higher_dot_keeps_the_lower_one_and_a_held_dot_is_not_sold_twice(
        db: psycopg.Connection) -> None:
    # given brawl 0 and pending dots 1, 2, 3
    cid = _character(db, 100)
    one, two, three = (_run(service.spend, cid, "brawl", v) for v in (1, 2, 3))
    # when the 2 is denied, then the 3 goes with it and the 1 stays pending, approvable
    denied = _run(service.deny_spend, two.request_id, 7)
    assert _states(db, one.request_id, two.request_id, three.request_id) == [
        "Pending", "Denied", "Denied"]
    assert denied.also_denied == [three.request_id]
    _run(service.approve_spend, one.request_id, 7)
    assert _held(db, cid, "brawl") == 1
    assert _xp(db, cid) == (100 - one.cost,) * 2
    # given a pending dot that is already held (brawl set to 2 meanwhile, as legacy data or
    # an operator may), when approved, then out_of_order: it is denied (refunded) instead
    again = _run(service.spend, cid, "brawl", 2)
    db.execute("UPDATE characters SET brawl = 2 WHERE id = %s", (cid,))
    with pytest.raises(OutOfOrder, match="already held"):
        _run(service.approve_spend, again.request_id, 7)


def test_weekly_approval_awards_each_claimed_category_once(db: psycopg.Connection) -> None:
    # given a claim for finishing and rp (earned in a scene the character played)
    cid, other = _character(db), _character(db)
    played, not_played = _scene(db, [cid]), _scene(db, [other])
    week = db.execute(
        "INSERT INTO weekly_xp_requests (character_id, week, finishing, rp, rp_scene_id) "
        "VALUES (%s, '2026-11-23', true, true, %s) RETURNING id", (cid, played)).fetchone()
    bad = db.execute(
        "INSERT INTO weekly_xp_requests (character_id, week, focus, focus_scene_id) "
        "VALUES (%s, '2026-11-16', true, %s) RETURNING id", (cid, not_played)).fetchone()
    assert week is not None and bad is not None
    # when approved, then two XP in one ledger row, and a second approval is already_processed
    done = _run(service.approve_weekly, week[0], 42)
    assert (done.categories, done.xp_awarded) == (["finishing", "rp"],
                                                  2 * rules.WEEKLY_XP_PER_CATEGORY)
    assert _xp(db, cid) == (2, 2)
    with pytest.raises(AlreadyProcessed):
        _run(service.approve_weekly, week[0], 42)
    # and a claim naming a scene the character did not play is not_a_participant
    with pytest.raises(NotAParticipant):
        _run(service.approve_weekly, bad[0], 42)
    assert _xp(db, cid) == (2, 2)


def test_the_ledger_refuses_a_second_award_for_the_same_scene(db: psycopg.Connection) -> None:
    # given an awarded scene; when SQL outside the service writes its award again
    cid = _character(db)
    scene = _scene(db, [cid])
    _run(service.award_scene, scene, {cid: True})
    # then the partial unique index of migration 0004 refuses it
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute("INSERT INTO xp_ledger (character_id, delta, kind, scene_id) "
                   "VALUES (%s, 1, 'award', %s)", (cid, scene))


def test_costs_in_sql_match_the_rules(db: psycopg.Connection) -> None:
    # given every trait type and every new value a cost exists for
    cases = []
    for kind in rules.XP_COST_MULTIPLIER:
        for value in range(1, 11):
            try:
                cases.append((kind, value, rules.xp_cost(kind, value)))
            except ValueError:
                continue
    # when SQL computes them (demo data, the legacy migration), then it agrees with Python
    expr = rules.xp_cost_sql("t.k", "t.v")
    for kind, value, cost in cases:
        got = db.execute(f"SELECT {expr} FROM (VALUES (%s::text, %s::int)) AS t(k, v)",
                         (kind, value)).fetchone()
        assert got == (cost,), (kind, value)
        assert rules.value_for_cost(kind, cost) == value


def test_every_flow_on_a_legacy_rule_breaker_fails_cleanly_naming_it(
        db: psycopg.Connection) -> None:
    # given a character with a pending spend, then found to break a rule its row predates
    # (dexterity 0: the NOT VALID constraint refuses any update of the row)
    cid = _character(db, 20)
    spent = _run(service.spend, cid, "brawl", 1)
    with constraints_off(db):
        db.execute("UPDATE characters SET dexterity = 0 WHERE id = %s", (cid,))
    before = (_xp(db, cid), _states(db, spent.request_id))
    # when any XP flow touches it: spend, approve, deny
    for flow, args in ((service.spend, (cid, "strength", 2)),
                       (service.approve_spend, (spent.request_id, 9)),
                       (service.deny_spend, (spent.request_id, 9))):
        # then a domain error (not retried) names the character, the rule and the fix
        with pytest.raises(CharacterRuleViolation) as err:
            _run(flow, *args)
        assert err.value.code == "character_rule_violation"
        assert f"character {cid} breaks rule dexterity_range" in str(err.value)
        assert "warden audit --fix" in str(err.value)
        # and nothing changed
        assert (_xp(db, cid), _states(db, spent.request_id)) == before
