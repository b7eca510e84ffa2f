"""violation indexes: partial indexes of the characters and scenes rows breaking a rule

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 14:40:00

PostgreSQL evaluates the rules' predicate at every write of a row and keeps the offenders
in a small index; the integrity audit reads them from it instead of evaluating ~35
predicates on each of a million rows (docs/adr/0011). Frozen copies of
domain.checks.VIOLATION_INDEXES at this revision; each index's comment names the predicate
(a hash), and the audit uses an index only when that names the current rules (a
convention test fails when they differ: write a migration that rebuilds the index).
"""
import hashlib

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

INDEXES = {
    'ix_characters_broken': ('characters', "(NOT coalesce((xp >= 0), true) OR NOT coalesce((status IN ('Un', 'Sub', 'App', 'Ret', 'Dec')), true) OR NOT coalesce((strength BETWEEN 1 AND 10), true) OR NOT coalesce((dexterity BETWEEN 1 AND 10), true) OR NOT coalesce((stamina BETWEEN 1 AND 10), true) OR NOT coalesce((perception BETWEEN 1 AND 10), true) OR NOT coalesce((intelligence BETWEEN 1 AND 10), true) OR NOT coalesce((wits BETWEEN 1 AND 10), true) OR NOT coalesce((charisma BETWEEN 1 AND 10), true) OR NOT coalesce((manipulation BETWEEN 1 AND 10), true) OR NOT coalesce((appearance BETWEEN 1 AND 10), true) OR NOT coalesce((alertness BETWEEN 0 AND 10), true) OR NOT coalesce((athletics BETWEEN 0 AND 10), true) OR NOT coalesce((brawl BETWEEN 0 AND 10), true) OR NOT coalesce((empathy BETWEEN 0 AND 10), true) OR NOT coalesce((expression BETWEEN 0 AND 10), true) OR NOT coalesce((intimidation BETWEEN 0 AND 10), true) OR NOT coalesce((streetwise BETWEEN 0 AND 10), true) OR NOT coalesce((subterfuge BETWEEN 0 AND 10), true) OR NOT coalesce((crafts BETWEEN 0 AND 10), true) OR NOT coalesce((drive BETWEEN 0 AND 10), true) OR NOT coalesce((etiquette BETWEEN 0 AND 10), true) OR NOT coalesce((firearms BETWEEN 0 AND 10), true) OR NOT coalesce((melee BETWEEN 0 AND 10), true) OR NOT coalesce((stealth BETWEEN 0 AND 10), true) OR NOT coalesce((academics BETWEEN 0 AND 10), true) OR NOT coalesce((computer BETWEEN 0 AND 10), true) OR NOT coalesce((investigation BETWEEN 0 AND 10), true) OR NOT coalesce((medicine BETWEEN 0 AND 10), true) OR NOT coalesce((science BETWEEN 0 AND 10), true) OR NOT coalesce((willpower BETWEEN 1 AND 10), true) OR NOT coalesce((temporary_willpower BETWEEN 0 AND 10), true) OR NOT coalesce((temporary_willpower <= willpower), true) OR NOT coalesce((age IS NULL OR age BETWEEN 0 AND 500), true) OR NOT coalesce((apparent_age IS NULL OR apparent_age BETWEEN 0 AND 200), true))"),
    'ix_scenes_broken': ('scenes', '(NOT coalesce((finished OR NOT xp_given), true) OR (finished AND NOT xp_given))'),
}


def _tag(predicate: str) -> str:
    return "warden-rules:" + hashlib.sha256(predicate.encode()).hexdigest()[:16]


def upgrade() -> None:
    for name, (table, predicate) in INDEXES.items():
        op.execute(f"CREATE INDEX {name} ON {table} (id) WHERE {predicate}")
        op.execute(f"COMMENT ON INDEX {name} IS '{_tag(predicate)}'")


def downgrade() -> None:
    for name in INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
