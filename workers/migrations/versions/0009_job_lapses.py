"""job lapses: how often a job's last attempt was taken from an owner not proven dead

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 19:40:00

A run whose lease lapsed while its database was away (a failover, a restart) may be
healthy: taking it over on its last attempt must not declare it dead (review N5). Such a
takeover spends no attempt; this counter bounds how often that may happen, so a job that
kills every worker on another host (a poison pill nobody can prove dead) still ends `dead`.
A constant default: no table rewrite (PostgreSQL >= 11).
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('job_runs', sa.Column('lapses', sa.SmallInteger(), server_default='0',
                                        nullable=False))


def downgrade() -> None:
    op.drop_column('job_runs', 'lapses')
