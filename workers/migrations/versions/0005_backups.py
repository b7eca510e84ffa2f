"""backups, their manifests and verification verdicts

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 20:20:00
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'backups',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column('status', sa.String(length=16), server_default='running', nullable=False),
        sa.Column('job_id', sa.UUID(), nullable=True),
        sa.Column('database', sa.String(length=200), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('partial_path', sa.Text(), nullable=False),
        sa.Column('dump_host', sa.String(length=200), nullable=True),
        sa.Column('dump_pid', sa.Integer(), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.Column('snapshot_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('bytes', sa.BigInteger(), nullable=True),
        sa.Column('sha256', sa.String(length=64), nullable=True),
        sa.Column('server_version', sa.String(length=64), nullable=True),
        sa.Column('server_version_num', sa.Integer(), nullable=True),
        sa.Column('pg_dump_version', sa.String(length=64), nullable=True),
        sa.Column('table_counts', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('verdict', sa.String(length=16), nullable=True),
        sa.Column('verified_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('restore_seconds', sa.Float(), nullable=True),
        sa.Column('verify_report', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('verify_error', sa.Text(), nullable=True),
        sa.Column('verify_job_id', sa.UUID(), nullable=True),
        sa.Column('verify_started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('pruned_at', sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed', 'pruned')",
                           name=op.f('ck_backups_status')),
        sa.CheckConstraint("verdict IS NULL OR verdict IN ('passed', 'failed')",
                           name=op.f('ck_backups_verdict')),
        sa.CheckConstraint(
            "status NOT IN ('succeeded', 'pruned') OR (sha256 IS NOT NULL AND bytes IS NOT NULL "
            "AND table_counts IS NOT NULL AND snapshot_at IS NOT NULL)",
            name=op.f('ck_backups_complete_manifest')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_backups')),
    )
    # At most one running backup, whichever process runs it.
    op.create_index('uq_backups_one_running', 'backups', [sa.text('(true)')], unique=True,
                    postgresql_where=sa.text("status = 'running'"))
    op.create_index('ix_backups_status_snapshot', 'backups', ['status', 'snapshot_at'])
    op.create_index('ix_backups_job_id', 'backups', ['job_id'])


def downgrade() -> None:
    op.drop_index('ix_backups_job_id', table_name='backups')
    op.drop_index('ix_backups_status_snapshot', table_name='backups')
    op.drop_index('uq_backups_one_running', table_name='backups')
    op.drop_table('backups')
