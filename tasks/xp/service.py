"""The XP flows of DOMAIN.md, each one transaction in the caller's session.

Why these locks: every flow locks the rows it changes before it reads what it decides on,
in one global order: scene, then characters (ascending id), then the request. Two flows
touching the same rows therefore queue instead of deadlocking. The locks are FOR NO KEY
UPDATE (what an UPDATE of a non-key column takes anyway), so inserts elsewhere that only
reference these rows (foreign-key checks take FOR KEY SHARE) are never blocked by them.

Every change of characters.xp writes its xp_ledger row in the same transaction (with the
job id), so xp always equals the ledger sum; the partial unique indexes of migration 0004
make a second award of the same scene, spend or weekly claim impossible even for a caller
that bypasses these functions. Domain errors (domain.errors) roll everything back.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from domain import rules
from domain.errors import (
    AlreadyProcessed,
    InsufficientXp,
    InvalidRequest,
    NotAParticipant,
    OutOfOrder,
    XpAlreadyGiven,
    character_rules_named,
)


@dataclass(frozen=True)
class Result:
    """Base of the flows' results: a JSON-ready dict for job_runs.result."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AwardResult(Result):
    scene_id: int
    awarded: list[int]  # character ids that got the scene's XP, ascending
    xp_each: int


@dataclass(frozen=True)
class SpendResult(Result):
    request_id: int
    character_id: int
    trait_name: str
    trait_value: int
    cost: int
    xp_left: int


@dataclass(frozen=True)
class DecisionResult(Result):
    request_id: int
    character_id: int
    state: str
    trait_name: str
    trait_value: int  # the value the request asked for
    refunded: int  # everything this decision refunded (the higher dots a denial took too)
    xp: int
    also_denied: list[int] = field(default_factory=list)  # higher pending dots, ascending


@dataclass(frozen=True)
class WeeklyResult(Result):
    request_id: int
    character_id: int
    categories: list[str]
    xp_awarded: int
    xp: int


def _job(job_id: str | uuid.UUID | None) -> uuid.UUID | None:
    return None if job_id is None else uuid.UUID(str(job_id))


def _lock_characters(session: Session, ids: list[int]) -> dict[int, int]:
    """Lock the characters in ascending id order; their xp by id (missing ids are absent)."""
    rows = session.execute(
        text("SELECT id, xp FROM characters WHERE id = ANY(:ids) ORDER BY id "
             "FOR NO KEY UPDATE"),
        {"ids": sorted(ids)},
    ).all()
    return {int(r.id): int(r.xp) for r in rows}


def _ledger(session: Session, rows: list[dict[str, Any]]) -> None:
    """Append ledger rows (one statement); each dict: character_id, delta, kind, reason and
    optionally scene_id / spend_request_id / weekly_request_id, job_id."""
    if not rows:
        return
    full = [{"scene_id": None, "spend_request_id": None, "weekly_request_id": None,
             "job_id": None, **r} for r in rows]
    session.execute(
        text("INSERT INTO xp_ledger (character_id, delta, kind, reason, scene_id, "
             "spend_request_id, weekly_request_id, job_id) VALUES (:character_id, :delta, "
             ":kind, :reason, :scene_id, :spend_request_id, :weekly_request_id, :job_id)"),
        full,
    )


def award_scene(session: Session, scene_id: int, awards: Mapping[int, bool], *,
                job_id: str | uuid.UUID | None = None) -> AwardResult:
    """Give each participant named true the scene's XP and mark the scene xp_given.

    Raises InvalidRequest (no such scene, or not finished: the schema forbids xp_given on an
    unfinished scene), XpAlreadyGiven (what makes a repeated award harmless) and
    NotAParticipant (a named character is not in the scene: an error, never a silent skip).
    """
    # Two statements (a bench's hot path): the scene locked with its participants, then the
    # winners locked (ascending id), credited, ledgered and the flag set in one statement.
    scene = session.execute(
        text("SELECT s.id, s.finished, s.xp_given, ARRAY(SELECT p.character_id "
             "FROM scene_participants p WHERE p.scene_id = s.id) AS participants "
             "FROM scenes s WHERE s.id = :id FOR NO KEY UPDATE OF s"),
        {"id": scene_id},
    ).first()
    if scene is None:
        raise InvalidRequest(f"no scene {scene_id}")
    if scene.xp_given:
        raise XpAlreadyGiven(f"scene {scene_id} has already given its XP")
    if not scene.finished:
        raise InvalidRequest(f"scene {scene_id} is not finished")
    strangers = sorted(set(awards) - set(scene.participants))
    if strangers:
        raise NotAParticipant(
            f"characters {strangers} are not participants of scene {scene_id}",
            characters=strangers,
        )
    winners = sorted(cid for cid, earned in awards.items() if earned)
    # A winner with a legacy rule violation makes PostgreSQL refuse the credit: a domain
    # error naming the character and the rule (D4), not an internal error retried in vain.
    with character_rules_named():
        _credit(session, scene_id, winners, job_id)
    return AwardResult(scene_id, winners, rules.SCENE_AWARD_XP)


def _credit(session: Session, scene_id: int, winners: list[int],
            job_id: str | uuid.UUID | None) -> None:
    session.execute(text("""
        WITH locked AS (
            SELECT id FROM characters WHERE id = ANY(:ids) ORDER BY id FOR NO KEY UPDATE
        ), credited AS (
            UPDATE characters c SET xp = c.xp + :xp FROM locked l WHERE c.id = l.id
            RETURNING c.id
        ), ledger AS (
            INSERT INTO xp_ledger (character_id, delta, kind, reason, scene_id, job_id)
            SELECT id, :xp, 'award', 'scene XP', :scene, :job FROM credited
            RETURNING 1
        )
        UPDATE scenes SET xp_given = true WHERE id = :scene
    """), {"ids": winners, "xp": rules.SCENE_AWARD_XP, "scene": scene_id,
           "job": _job(job_id)})


def spend(session: Session, character_id: int, trait_name: str, trait_value: int, *,
          job_id: str | uuid.UUID | None = None) -> SpendResult:
    """Deduct the cost of raising `trait_name` to `trait_value` now and file a Pending request.

    The new value must be exactly one dot above both the current value and every pending
    request for the same trait (rules.next_spend_value): a second pending dot is paid at
    the next dot's price, and is only ever approved after the dot below it.
    """
    if trait_name not in rules.SPENDABLE_TRAITS:
        raise InvalidRequest(f"{trait_name!r} is not a trait XP can raise")
    kind = rules.trait_type(trait_name)
    # trait_name is one of the column names above, never user text.
    row = session.execute(
        text(f"SELECT id, xp, {trait_name} AS current FROM characters WHERE id = :id "
             "FOR NO KEY UPDATE"),
        {"id": character_id},
    ).first()
    if row is None:
        raise InvalidRequest(f"no character {character_id}")
    pending = session.execute(
        text("SELECT max(trait_value) FROM xp_spend_requests WHERE character_id = :c "
             "AND trait_name = :t AND state = :pending"),
        {"c": character_id, "t": trait_name, "pending": rules.SPEND_PENDING},
    ).scalar_one()
    expected = rules.next_spend_value(int(row.current),
                                      None if pending is None else int(pending))
    rng = rules.trait_range(trait_name)
    if trait_value != expected:
        raise InvalidRequest(
            f"{trait_name} can only be raised to {expected} next (asked {trait_value})")
    if not rng.contains(trait_value):
        raise InvalidRequest(f"{trait_name} cannot exceed {rng.high}")
    cost = rules.xp_cost(kind, trait_value)
    if row.xp < cost:
        raise InsufficientXp(f"character {character_id} has {row.xp} XP; {trait_name} "
                             f"{trait_value} costs {cost}", xp=int(row.xp), cost=cost)
    request_id = int(session.execute(
        text("INSERT INTO xp_spend_requests (character_id, trait_name, trait_type, "
             "trait_value, cost) VALUES (:c, :t, :k, :v, :cost) RETURNING id"),
        {"c": character_id, "t": trait_name, "k": kind, "v": trait_value, "cost": cost},
    ).scalar_one())
    with character_rules_named():
        xp_left = int(session.execute(
            text("UPDATE characters SET xp = xp - :cost WHERE id = :id RETURNING xp"),
            {"cost": cost, "id": character_id},
        ).scalar_one())
    _ledger(session, [{"character_id": character_id, "delta": -cost, "kind": "spend",
                       "reason": f"{trait_name} {trait_value}",
                       "spend_request_id": request_id, "job_id": _job(job_id)}])
    return SpendResult(request_id, character_id, trait_name, trait_value, cost, xp_left)


def _lock_request(session: Session, request_id: int) -> tuple[Any, int]:
    """Lock a spend request's character, then the request; (request row, character xp)."""
    owner = session.execute(
        text("SELECT character_id FROM xp_spend_requests WHERE id = :id"), {"id": request_id}
    ).scalar()
    if owner is None:
        raise InvalidRequest(f"no spend request {request_id}")
    xp = _lock_characters(session, [int(owner)])[int(owner)]
    request = session.execute(
        text("SELECT id, character_id, trait_name, trait_type, trait_value, cost, state "
             "FROM xp_spend_requests WHERE id = :id FOR NO KEY UPDATE"),
        {"id": request_id},
    ).one()
    if request.state != rules.SPEND_PENDING:
        raise AlreadyProcessed(f"spend request {request_id} is already {request.state}")
    return request, xp


def approve_spend(session: Session, request_id: int, decided_by: int, *,
                  job_id: str | uuid.UUID | None = None) -> DecisionResult:
    """Mark a Pending request Approved and raise the trait to its value (the XP was paid at
    the spend).

    Dots are approved in order (rules.approvable): the trait must be exactly one below the
    request's value, else OutOfOrder and the request stays Pending. Why: a dot approved
    over a lower dot that is later denied (or never approved) would be held without the
    lower dot's price having been paid (review N7). No XP moves on approval, so it writes
    no ledger row (job_id is taken for a uniform signature).
    """
    request, xp = _lock_request(session, request_id)
    if request.trait_name in rules.TRAIT_RANGES:  # a column (legacy 'other' traits are not)
        column = request.trait_name  # checked against the rules' column names just above
        current = int(session.execute(  # the character is locked: it cannot move under us
            text(f"SELECT {column} FROM characters WHERE id = :id"),
            {"id": request.character_id},
        ).scalar_one())
        value = int(request.trait_value)
        if not rules.approvable(current, value):
            raise OutOfOrder(_out_of_order(session, request, current))
        with character_rules_named():
            session.execute(
                text(f"UPDATE characters SET {column} = :v WHERE id = :id"),
                {"v": value, "id": request.character_id},
            )
    session.execute(
        text("UPDATE xp_spend_requests SET state = :state, decided_at = now(), "
             "decided_by = :by WHERE id = :id"),
        {"state": rules.SPEND_APPROVED, "by": decided_by, "id": request_id},
    )
    return DecisionResult(request_id, int(request.character_id), rules.SPEND_APPROVED,
                          str(request.trait_name), int(request.trait_value), 0, xp)


def _out_of_order(session: Session, request: Any, current: int) -> str:
    """Why a request's dot cannot be approved, and what the storyteller can do instead."""
    name, value = str(request.trait_name), int(request.trait_value)
    if current >= value:
        return (f"spend request {request.id}: {name} {value} is already held ({name} is "
                f"{current}); deny it to refund its {int(request.cost)} XP")
    below = session.execute(
        text("SELECT id FROM xp_spend_requests WHERE character_id = :c AND trait_name = :t "
             "AND trait_value = :v AND state = :pending ORDER BY id LIMIT 1"),
        {"c": request.character_id, "t": name, "v": value - 1, "pending": rules.SPEND_PENDING},
    ).scalar()
    waiting = (f"; approve request {below} ({name} {value - 1}) first" if below is not None
               else "")
    return (f"spend request {request.id}: {name} {value} needs {name} {value - 1} first "
            f"({name} is {current}){waiting}")


def deny_spend(session: Session, request_id: int, decided_by: int, *,
               job_id: str | uuid.UUID | None = None) -> DecisionResult:
    """Mark a Pending request Denied and refund its cost (a ledger refund row); every higher
    pending dot of the same trait is denied and refunded with it (rules.denied_with).

    Why the higher dots go too: each was priced on top of this one and could now never be
    approved in order; refunding them keeps every held dot paid at its price (review N7).
    """
    request, _ = _lock_request(session, request_id)
    higher = session.execute(  # the character is locked: no spend can add to these
        text("SELECT id, trait_value, cost FROM xp_spend_requests WHERE character_id = :c "
             "AND trait_name = :t AND state = :pending AND id <> :id ORDER BY id "
             "FOR NO KEY UPDATE"),
        {"c": request.character_id, "t": request.trait_name, "pending": rules.SPEND_PENDING,
         "id": request_id},
    ).all()
    taken = set(rules.denied_with(int(request.trait_value),
                                  [int(r.trait_value) for r in higher]))
    also = sorted((int(r.trait_value), int(r.id), int(r.cost)) for r in higher
                  if int(r.trait_value) in taken)
    ids = [request_id, *(rid for _, rid, _ in also)]
    session.execute(
        text("UPDATE xp_spend_requests SET state = :state, decided_at = now(), "
             "decided_by = :by WHERE id = ANY(:ids)"),
        {"state": rules.SPEND_DENIED, "by": decided_by, "ids": ids},
    )
    cost = int(request.cost) + sum(c for _, _, c in also)
    with character_rules_named():
        xp = int(session.execute(
            text("UPDATE characters SET xp = xp + :cost WHERE id = :id RETURNING xp"),
            {"cost": cost, "id": request.character_id},
        ).scalar_one())
    character, job = int(request.character_id), _job(job_id)
    _ledger(session, [
        {"character_id": character, "delta": int(request.cost), "kind": "refund",
         "reason": "spend request denied", "spend_request_id": request_id, "job_id": job},
        *({"character_id": character, "delta": c, "kind": "refund",
           "reason": f"spend request denied with request {request_id} (a dot below it)",
           "spend_request_id": rid, "job_id": job} for _, rid, c in also),
    ])
    return DecisionResult(request_id, character, rules.SPEND_DENIED,
                          str(request.trait_name), int(request.trait_value), cost, xp,
                          [rid for _, rid, _ in also])


def approve_weekly(session: Session, request_id: int, approved_by: int, *,
                   job_id: str | uuid.UUID | None = None) -> WeeklyResult:
    """Approve a weekly claim once: one XP per claimed category, each scene category
    earned in a scene the character played (else NotAParticipant)."""
    owner = session.execute(
        text("SELECT character_id FROM weekly_xp_requests WHERE id = :id"), {"id": request_id}
    ).scalar()
    if owner is None:
        raise InvalidRequest(f"no weekly XP request {request_id}")
    _lock_characters(session, [int(owner)])
    scene_cols = ", ".join(f"{c}_scene_id" for c in rules.WEEKLY_NEEDS_SCENE)
    request = session.execute(
        text(f"SELECT id, character_id, approved, {', '.join(rules.WEEKLY_CATEGORIES)}, "
             f"{scene_cols} FROM weekly_xp_requests WHERE id = :id FOR NO KEY UPDATE"),
        {"id": request_id},
    ).mappings().one()
    if request["approved"]:
        raise AlreadyProcessed(f"weekly XP request {request_id} is already approved")
    claimed = [c for c in rules.WEEKLY_CATEGORIES if request[c]]
    if not claimed:
        raise InvalidRequest(f"weekly XP request {request_id} claims no category")
    scenes = sorted({int(request[f"{c}_scene_id"]) for c in claimed
                     if c in rules.WEEKLY_NEEDS_SCENE})
    if scenes:
        played = set(session.execute(
            text("SELECT scene_id FROM scene_participants WHERE character_id = :c "
                 "AND scene_id = ANY(:s)"),
            {"c": owner, "s": scenes},
        ).scalars())
        missing = [s for s in scenes if s not in played]
        if missing:
            raise NotAParticipant(f"character {owner} did not play scenes {missing}",
                                  scenes=missing)
    earned = len(claimed) * rules.WEEKLY_XP_PER_CATEGORY
    session.execute(
        text("UPDATE weekly_xp_requests SET approved = true, approved_at = now(), "
             "approved_by = :by WHERE id = :id"),
        {"by": approved_by, "id": request_id},
    )
    with character_rules_named():
        xp = int(session.execute(
            text("UPDATE characters SET xp = xp + :n WHERE id = :id RETURNING xp"),
            {"n": earned, "id": owner},
        ).scalar_one())
    _ledger(session, [{"character_id": int(owner), "delta": earned, "kind": "award",
                       "reason": "weekly XP: " + ", ".join(claimed),
                       "weekly_request_id": request_id, "job_id": _job(job_id)}])
    return WeeklyResult(request_id, int(owner), claimed, earned, xp)
