"""Migration `legacy_spent_xp`: the legacy spent_xp JSON lists become xp_spend_requests rows.

The two shapes of DOMAIN.md:
- newer `{index: int, trait, value: <property name>, cost, category, approved, timestamp,
  approved_at?}`: it names the trait but not its new value, so the value is the one whose
  one-dot cost (domain.rules.xp_cost) is the recorded cost; a cost no value has is malformed;
- older `{index: "<id>_<type>_<trait>_<value>", trait, value: int, cost, approved}`: the
  index must name this character and agree with `value`; it has no time, so the request
  gets the character's created_at (the earliest it can be; now() would count years-old
  spends as today's activity in the health report).
`approved` is a state name (any case) or a boolean (true = Approved, false = Pending).

Why set-based SQL: the whole batch is one INSERT ... SELECT (the bench compares it with the
same statement over the whole table). Each record's row carries `legacy_ref`
`spent_xp[<position>]:<index>`, and the unique (character_id, legacy_ref) makes a repeated
batch insert nothing. A malformed record is not migrated: it is written to
data_migration_rejects with the character, its position in the list and the reason. The
source JSON is left as it was (the reverse deletes what the migration made).
No ledger rows: the XP of these spends left characters.xp long ago; the opening-balance
migration accounts for it.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from domain import rules
from tasks.data_migrations.registry import Batch, Context, Migration, Outcome, keyset_selector
from tasks.data_migrations.registry import register as _register

NAME = "legacy_spent_xp"
# Legacy spends had no decider; a request decided by the new flows has one (the reverse
# keeps those).
MAX_COST = 999_999  # 6 digits: anything longer is not a cost (and would overflow int)
MAX_TRAIT_NAME = 64  # xp_spend_requests.trait_name is varchar(64)

REF = "left('spent_xp[' || s.pos || ']' || coalesce(':' || (s.rec->>'index'), ''), 200)"
TRY_TIME = "warden_try_timestamptz"  # migration 0004: NULL instead of an error


def _quoted(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def _range_sql(value: str) -> str:
    """SQL: the range problem of `value` for the record's trait type, or NULL."""
    whens = []
    for kind, rng in (("attribute", rules.ATTRIBUTE_RANGE), ("ability", rules.ABILITY_RANGE),
                      ("willpower", rules.WILLPOWER_RANGE)):
        whens.append(
            f"WHEN p.trait_type = '{kind}' AND NOT {value} BETWEEN {rng.low} AND {rng.high} "
            f"THEN 'value ' || {value} || ' outside {rng.low}..{rng.high}'"
        )
    return "CASE " + " ".join(whens) + " END"


def _value_for_cost_sql(kind: str, cost: str) -> str:
    """rules.value_for_cost as SQL (NULL where no value has that cost)."""
    whens = [f"WHEN {kind} = 'ability' AND {cost} = {rules.XP_NEW_ABILITY_COST} THEN 1"]
    for k, m in rules.XP_COST_MULTIPLIER.items():
        whens.append(f"WHEN {kind} = '{k}' AND {cost} > 0 AND {cost} % {m} = 0 "
                     f"AND ({rules.xp_cost_sql(repr(k), f'({cost} / {m} + 1)')}) = {cost} "
                     f"THEN {cost} / {m} + 1")
    return "CASE " + " ".join(whens) + " END"


def _transform_sql() -> str:
    """One statement: expand, check, insert the good records, record the bad ones."""
    kinds = _quoted(rules.TRAIT_TYPES)
    attributes, abilities = _quoted(rules.ATTRIBUTES), _quoted(rules.ABILITIES)
    # `approved` names a state in any case, or is a boolean (true: approved, false: pending).
    approved, pending = f"'{rules.SPEND_APPROVED}'", f"'{rules.SPEND_PENDING}'"
    legacy_states = " ".join(f"WHEN '{s.lower()}' THEN '{s}'" for s in rules.SPEND_STATES)
    problem = f"""CASE
        WHEN jsonb_typeof(p.rec) <> 'object'
            THEN 'record is a ' || jsonb_typeof(p.rec) || ', not an object'
        WHEN p.shape IS NULL THEN 'index is missing or neither a number nor a string'
        WHEN p.shape = 'old' AND p.m IS NULL
            THEN 'index ' || (p.rec->>'index') || ' is not <id>_<type>_<trait>_<value>'
        WHEN p.shape = 'old' AND p.m[1] <> p.character_id::text
            THEN 'index names character ' || p.m[1] || ', not ' || p.character_id
        WHEN p.cost IS NULL OR p.cost <= 0
            THEN 'cost ' || coalesce(p.rec->>'cost', '(missing)') || ' is not a positive integer'
        WHEN p.trait_type IS NULL OR p.trait_type NOT IN {kinds}
            THEN 'unknown trait type ' || coalesce(quote_literal(p.trait_type), '(missing)')
        WHEN p.trait_name IS NULL OR p.trait_name = ''
             OR length(p.trait_name) > {MAX_TRAIT_NAME}
             OR (p.trait_type = 'attribute' AND p.trait_name NOT IN {attributes})
             OR (p.trait_type = 'ability' AND p.trait_name NOT IN {abilities})
             OR (p.trait_type = 'willpower' AND p.trait_name <> 'willpower')
            THEN 'unknown ' || p.trait_type || ' '
                 || coalesce(quote_literal(p.trait_name), '(missing)')
        WHEN p.trait_value IS NULL AND p.shape = 'new'
            THEN 'cost ' || p.cost || ' matches no ' || p.trait_type || ' value'
        WHEN p.trait_value IS NULL
            THEN 'value ' || coalesce(p.rec->>'value', '(missing)') || ' is not an integer'
        WHEN p.shape = 'old' AND p.m[4] <> p.trait_value::text
            THEN 'index value ' || p.m[4] || ' differs from value ' || p.trait_value
        WHEN ({_range_sql('p.trait_value')}) IS NOT NULL THEN ({_range_sql('p.trait_value')})
        WHEN p.state IS NULL
            THEN 'approved ' || coalesce(p.rec->>'approved', '(missing)') || ' is not a state'
        WHEN p.created IS NULL
            THEN 'timestamp ' || coalesce(p.rec->>'timestamp', '(missing)') || ' is not a time'
        WHEN p.shape = 'new' AND jsonb_typeof(p.rec->'approved_at') NOT IN ('null')
             AND p.approved_at IS NULL
            THEN 'approved_at ' || (p.rec->>'approved_at') || ' is not a time'
    END"""
    # Each step is a subquery behind OFFSET 0, so its columns are computed once per record:
    # flattened (as CTEs read once are), every reference to a column would repeat its whole
    # expression, and the nested CASEs below made that 150 us a record instead of ~10 us.
    return f"""
    WITH checked AS (
        SELECT p.*, {problem} AS problem
        FROM (
            SELECT f.*,
                   CASE f.shape
                       WHEN 'new' THEN {_value_for_cost_sql('f.trait_type', 'f.cost')}
                       WHEN 'old' THEN CASE WHEN jsonb_typeof(f.rec->'value') = 'number'
                                             AND (f.rec->>'value') ~ '^\\d{{1,4}}$'
                                            THEN (f.rec->>'value')::int END
                   END AS trait_value
            FROM (
                SELECT x.*,
                       CASE x.shape WHEN 'new' THEN x.rec->>'category' WHEN 'old' THEN x.m[2]
                       END AS trait_type,
                       CASE x.shape WHEN 'new' THEN
                                CASE WHEN jsonb_typeof(x.rec->'value') = 'string'
                                     THEN x.rec->>'value' END
                            WHEN 'old' THEN x.m[3] END AS trait_name,
                       CASE x.shape WHEN 'new' THEN {TRY_TIME}(x.rec->>'timestamp')
                            WHEN 'old' THEN x.character_created END AS created,
                       CASE x.shape WHEN 'new' THEN {TRY_TIME}(x.rec->>'approved_at') END
                           AS approved_at
                FROM (
                    SELECT s.*, {REF} AS legacy_ref,
                           CASE WHEN jsonb_typeof(s.rec) <> 'object' THEN NULL
                                WHEN jsonb_typeof(s.rec->'index') = 'number' THEN 'new'
                                WHEN jsonb_typeof(s.rec->'index') = 'string' THEN 'old'
                           END AS shape,
                           CASE WHEN jsonb_typeof(s.rec) = 'object'
                                THEN regexp_match(s.rec->>'index',
                                                  '^(\\d+)_([a-z]+)_([a-z_]+)_(\\d+)$')
                           END AS m,
                           CASE WHEN jsonb_typeof(s.rec) = 'object'
                                     AND jsonb_typeof(s.rec->'cost') = 'number'
                                     AND (s.rec->>'cost') ~ '^\\d{{1,6}}$'
                                THEN (s.rec->>'cost')::int END AS cost,
                           CASE WHEN jsonb_typeof(s.rec) <> 'object' THEN NULL
                                WHEN jsonb_typeof(s.rec->'approved') = 'boolean'
                                THEN CASE WHEN (s.rec->>'approved')::boolean THEN {approved}
                                          ELSE {pending} END
                                WHEN jsonb_typeof(s.rec->'approved') = 'string'
                                THEN CASE lower(s.rec->>'approved')
                                          {legacy_states} END
                           END AS state
                    FROM (
                        SELECT c.id AS character_id, c.created_at AS character_created, e.rec,
                               (e.pos - 1)::int AS pos
                        FROM characters c
                        CROSS JOIN LATERAL jsonb_array_elements(
                            CASE jsonb_typeof(c.spent_xp) WHEN 'array' THEN c.spent_xp
                                 ELSE '[]'::jsonb END
                        ) WITH ORDINALITY AS e(rec, pos)
                        WHERE c.id > :lower AND c.id <= :upper AND c.spent_xp IS NOT NULL
                    ) s
                    OFFSET 0
                ) x
                OFFSET 0
            ) f
            OFFSET 0
        ) p
        OFFSET 0
    ), ins AS (
        INSERT INTO xp_spend_requests (character_id, trait_name, trait_type, trait_value,
                                       cost, state, created_at, decided_at, legacy_ref)
        SELECT character_id, trait_name, trait_type, trait_value, cost, state, created,
               CASE WHEN state <> {pending} THEN coalesce(approved_at, created) END,
               legacy_ref
        FROM checked WHERE problem IS NULL
        ON CONFLICT (character_id, legacy_ref) DO NOTHING
        RETURNING 1
    ), bad AS (
        SELECT character_id, pos, problem, rec FROM checked WHERE problem IS NOT NULL
        UNION ALL
        SELECT c.id, -1, 'spent_xp is a ' || jsonb_typeof(c.spent_xp) || ', not a list',
               c.spent_xp
        FROM characters c
        WHERE c.id > :lower AND c.id <= :upper AND c.spent_xp IS NOT NULL
          AND jsonb_typeof(c.spent_xp) NOT IN ('array', 'null')
    ), rej AS (
        INSERT INTO data_migration_rejects (migration, run_no, row_id, position, reason,
                                            record)
        SELECT :name, :run_no, character_id, pos, problem, rec FROM bad
        ON CONFLICT (migration, row_id, position) DO UPDATE
            SET reason = EXCLUDED.reason, record = EXCLUDED.record, run_no = EXCLUDED.run_no
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins) AS changed, (SELECT count(*) FROM rej) AS rejected
    """


TRANSFORM = text(_transform_sql())
CLEAR_REJECTS = text(
    "DELETE FROM data_migration_rejects WHERE migration = :name AND row_id > :lower "
    "AND row_id <= :upper"
)


def transform(session: Session, ctx: Context, batch: Batch) -> Outcome:
    """Migrate the records of characters (lower, upper]; rejects recomputed for the range."""
    args = {"lower": batch.lower if batch.lower is not None else -1, "upper": batch.upper,
            "name": ctx.name, "run_no": ctx.run_no}
    session.execute(CLEAR_REJECTS, args)  # a record fixed since the last pass leaves
    # No JIT: the planner guesses 100 records per JSON list, so it JIT-compiles the wide
    # CASE above, which took 36 s of a 0.1 s batch of 1,000 characters (Postgres 15).
    session.execute(text("SET LOCAL jit = off"))
    row = session.execute(TRANSFORM, args).one()
    return Outcome(int(row.changed), int(row.rejected))


def verify(session: Session) -> int:
    """Records neither migrated nor reported as malformed (0 = done)."""
    return int(session.execute(text(f"""
        SELECT
          (SELECT count(*)
           FROM characters c
           CROSS JOIN LATERAL jsonb_array_elements(
               CASE jsonb_typeof(c.spent_xp) WHEN 'array' THEN c.spent_xp ELSE '[]'::jsonb END
           ) WITH ORDINALITY AS e(rec, pos)
           CROSS JOIN LATERAL (SELECT e.rec, (e.pos - 1)::int AS pos) s
           WHERE c.spent_xp IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM xp_spend_requests r
                             WHERE r.character_id = c.id AND r.legacy_ref = {REF})
             AND NOT EXISTS (SELECT 1 FROM data_migration_rejects j
                             WHERE j.migration = :name AND j.row_id = c.id
                               AND j.position = s.pos))
        + (SELECT count(*) FROM characters c
           WHERE c.spent_xp IS NOT NULL AND jsonb_typeof(c.spent_xp) NOT IN ('array', 'null')
             AND NOT EXISTS (SELECT 1 FROM data_migration_rejects j
                             WHERE j.migration = :name AND j.row_id = c.id
                               AND j.position = -1))
    """), {"name": NAME}).scalar_one())


def estimate(session: Session) -> int:
    """Characters carrying a spent_xp value (the rows the selector visits)."""
    return int(session.execute(
        text("SELECT count(*) FROM characters WHERE spent_xp IS NOT NULL")
    ).scalar_one())


def reverse(session: Session, batch: Batch) -> int:
    """Delete the requests this migration made for characters (lower, upper], except those
    decided or charged by the new XP flows since (they are live data now); returns rows."""
    args = {"lower": batch.lower if batch.lower is not None else -1, "upper": batch.upper,
            "name": NAME}
    session.execute(CLEAR_REJECTS, args)
    return int(session.execute(text(
        "DELETE FROM xp_spend_requests r WHERE r.character_id > :lower "
        "AND r.character_id <= :upper AND r.legacy_ref LIKE 'spent\\_xp[%' "
        "AND r.decided_by IS NULL "
        "AND NOT EXISTS (SELECT 1 FROM xp_ledger l WHERE l.spend_request_id = r.id)"
    ), args).rowcount)  # type: ignore[attr-defined]


MIGRATION = _register(Migration(
    name=NAME,
    description="Legacy spent_xp JSON records (both shapes) into xp_spend_requests rows; "
                "malformed records are reported with character and position",
    table="characters",
    select_next=keyset_selector("characters", "spent_xp IS NOT NULL"),
    transform=transform,
    verify=verify,
    estimate=estimate,
    reverse=reverse,
))
