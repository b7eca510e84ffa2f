"""Guards the XP family adds to the domain's xp_ledger (migration 0004).

Partial unique indexes: one award row per character and scene, one per weekly claim, one
spend and one refund row per spend request. The services already make each flow happen once
(flags and states under row locks); these make a second application impossible even for SQL
that bypasses them. Declared here so Alembic's metadata matches the database.
"""

from __future__ import annotations

from sqlalchemy import Index, text

from domain.models import XpLedger

LEDGER_GUARDS: tuple[Index, ...] = (
    Index("uq_xp_ledger_scene_award", XpLedger.scene_id, XpLedger.character_id, unique=True,
          postgresql_where=text("kind = 'award' AND scene_id IS NOT NULL")),
    Index("uq_xp_ledger_weekly_award", XpLedger.weekly_request_id, unique=True,
          postgresql_where=text("kind = 'award' AND weekly_request_id IS NOT NULL")),
    Index("uq_xp_ledger_spend", XpLedger.spend_request_id, unique=True,
          postgresql_where=text("kind = 'spend' AND spend_request_id IS NOT NULL")),
    Index("uq_xp_ledger_refund", XpLedger.spend_request_id, unique=True,
          postgresql_where=text("kind = 'refund' AND spend_request_id IS NOT NULL")),
)
