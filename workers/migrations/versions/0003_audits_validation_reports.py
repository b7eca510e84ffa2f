"""integrity audits, character validation and health reports

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 20:20:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
