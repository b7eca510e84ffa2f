"""audit findings: the outcomes of the scene_xp fix (award_submitted, award_pending)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 23:20:00

A fix run queues the missing award of each finished scene awaiting XP (review 2026-12-07,
drill D4); the scene's finding records that, or that an award job was already on its way.
The constraint is dropped, added NOT VALID and validated in the upgrade's one transaction
(env.py runs all of an upgrade in one): the DROP's ACCESS EXCLUSIVE lock on audit_findings
is held through the validating scan, so readers of /ui/audits wait for it (a short scan:
findings are a few rows per run).
"""
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

OLD = ("fixed", "resolved_meanwhile", "blocked", "gone", "unfixable")
NEW = (*OLD, "award_submitted", "award_pending")


def _replace(values: tuple[str, ...]) -> None:
    listed = ", ".join(f"'{v}'" for v in values)
    op.execute("ALTER TABLE audit_findings DROP CONSTRAINT ck_audit_findings_outcome")
    op.execute("ALTER TABLE audit_findings ADD CONSTRAINT ck_audit_findings_outcome "
               f"CHECK (outcome IS NULL OR outcome IN ({listed})) NOT VALID")
    op.execute("ALTER TABLE audit_findings VALIDATE CONSTRAINT ck_audit_findings_outcome")


def upgrade() -> None:
    _replace(NEW)


def downgrade() -> None:
    op.execute("UPDATE audit_findings SET outcome = NULL "
               "WHERE outcome IN ('award_submitted', 'award_pending')")
    _replace(OLD)
