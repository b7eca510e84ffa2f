"""Migration `xp_opening_balances`: an opening ledger entry for characters older than the
ledger, so that characters.xp equals the sum of the character's xp_ledger rows for everyone.

A character without an opening entry whose xp differs from its ledger sum held that
difference before the ledger existed: it gets one `adjust` row for it. A character that
already has an opening entry and still differs is not papered over: verify counts it,
so the migration does not succeed until the audit has explained it.

Why two statements: the batch's characters are locked FOR NO KEY UPDATE (ascending id, like
every XP flow) in one, and their xp and ledger sums are read in the next. The XP flows lock a
character FOR NO KEY UPDATE to change its xp and write its ledger row, so once the locks are
held no flow can change either, and a second batch over the same characters (a run taken
over while the old one's batch was still open) waits too: FOR SHARE would let both read
"no opening entry" and each write one (found by the XP property test). Under READ COMMITTED
a lock that had to wait returns the row's new version, but the rest of that same statement
reads its snapshot from before the wait: in one statement, xp would include the flow's
change and the ledger sum would not, and the opening entry would count it twice (review N2;
the migration could then never pass its verify). The second statement's snapshot starts
after the locks are held, so it sees the flow's xp and its ledger row, or the other batch's
opening entry, together.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.orm import Session

from tasks.data_migrations.registry import Batch, Context, Migration, Outcome, keyset_selector
from tasks.data_migrations.registry import register as _register

NAME = "xp_opening_balances"
# The demo generator's opening rows say 'opening balance: ...' too; ours name the
# migration, so the reverse deletes only what it made.
REASON = "opening balance: XP held before the ledger (data migration xp_opening_balances)"
OPENING = "x.kind = 'adjust' AND x.reason LIKE 'opening balance%'"

LOCK = text("""
    SELECT c.id FROM characters c WHERE c.id > :lower AND c.id <= :upper
    ORDER BY c.id FOR NO KEY UPDATE
""")

TRANSFORM = text(f"""
    WITH sums AS (
        SELECT c.id, c.xp, c.created_at,
               coalesce((SELECT sum(x.delta) FROM xp_ledger x WHERE x.character_id = c.id), 0)
                   AS total,
               EXISTS (SELECT 1 FROM xp_ledger x WHERE x.character_id = c.id AND {OPENING})
                   AS has_opening
        FROM characters c WHERE c.id = ANY(:ids)
    ), ins AS (
        INSERT INTO xp_ledger (character_id, delta, kind, reason, created_at, job_id)
        SELECT id, xp - total, 'adjust', :reason, created_at, :job_id
        FROM sums WHERE xp <> total AND NOT has_opening
        ORDER BY id
        RETURNING 1
    )
    SELECT count(*) AS changed FROM ins
""")


def transform(session: Session, ctx: Context, batch: Batch) -> Outcome:
    """Add the opening entries of characters (lower, upper]: lock them, then read and write
    in a statement whose snapshot starts after the locks (module docstring)."""
    isolation = session.execute(text("SHOW transaction_isolation")).scalar_one()
    if isolation != "read committed":  # one snapshot per transaction: the fix would not hold
        raise RuntimeError(f"{NAME} needs READ COMMITTED, not {isolation}")
    ids = list(session.execute(LOCK, {
        "lower": batch.lower if batch.lower is not None else -1, "upper": batch.upper,
    }).scalars())
    row = session.execute(TRANSFORM, {
        "ids": ids, "reason": REASON,
        "job_id": uuid.UUID(ctx.job_id) if ctx.job_id else None,
    }).one()
    return Outcome(int(row.changed))


def verify(session: Session) -> int:
    """Characters whose xp differs from their ledger sum (0 = done)."""
    return int(session.execute(text("""
        SELECT count(*) FROM characters c
        LEFT JOIN (SELECT character_id, sum(delta) AS total FROM xp_ledger GROUP BY 1) l
               ON l.character_id = c.id
        WHERE c.xp <> coalesce(l.total, 0)
    """)).scalar_one())


def estimate(session: Session) -> int:
    """Every character is visited."""
    return int(session.execute(text("SELECT count(*) FROM characters")).scalar_one())


def reverse(session: Session, batch: Batch) -> int:
    """Delete the opening entries this migration made for characters (lower, upper]."""
    return int(session.execute(text(
        "DELETE FROM xp_ledger WHERE character_id > :lower AND character_id <= :upper "
        "AND kind = 'adjust' AND reason = :reason"
    ), {"lower": batch.lower if batch.lower is not None else -1, "upper": batch.upper,
        "reason": REASON}).rowcount)  # type: ignore[attr-defined]


MIGRATION = _register(Migration(
    name=NAME,
    description="Opening XP ledger entries for characters that predate the ledger, so xp "
                "equals the ledger sum for everyone",
    table="characters",
    select_next=keyset_selector("characters"),
    transform=transform,
    verify=verify,
    estimate=estimate,
    reverse=reverse,
))
