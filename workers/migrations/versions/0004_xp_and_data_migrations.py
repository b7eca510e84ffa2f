"""XP job records and the data-migration registry state

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 20:20:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
