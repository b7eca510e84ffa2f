"""XP job records and the data-migration registry state

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 20:20:00

XP: partial unique indexes on xp_ledger, so a scene award, a weekly award, a spend or a
refund can be written once per character/request whatever code writes it.
Data migrations: per-migration state, per-batch records, pauses and rejected records; and
warden_try_timestamptz(), which parses legacy time strings to NULL instead of failing the
whole batch statement (Postgres 15 has no pg_input_is_valid).
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

MIGRATION_STATUSES = ("'pending', 'queued', 'running', 'paused', 'failed', 'cancelled', "
                      "'succeeded', 'reversing'")

LEDGER_GUARDS = (
    ("uq_xp_ledger_scene_award", ["scene_id", "character_id"],
     "kind = 'award' AND scene_id IS NOT NULL"),
    ("uq_xp_ledger_weekly_award", ["weekly_request_id"],
     "kind = 'award' AND weekly_request_id IS NOT NULL"),
    ("uq_xp_ledger_spend", ["spend_request_id"],
     "kind = 'spend' AND spend_request_id IS NOT NULL"),
    ("uq_xp_ledger_refund", ["spend_request_id"],
     "kind = 'refund' AND spend_request_id IS NOT NULL"),
)

TRY_TIMESTAMPTZ = """
CREATE OR REPLACE FUNCTION warden_try_timestamptz(value text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN value::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END;
$$
"""


def upgrade() -> None:
    for name, columns, where in LEDGER_GUARDS:
        op.create_index(name, 'xp_ledger', columns, unique=True,
                        postgresql_where=sa.text(where))

    op.create_table(
        'data_migrations',
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('status', sa.String(length=16), server_default='pending', nullable=False),
        sa.Column('run_no', sa.Integer(), server_default='0', nullable=False),
        sa.Column('cursor', sa.BigInteger(), nullable=True),
        sa.Column('rows_done', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('rows_total', sa.BigInteger(), nullable=True),
        sa.Column('rows_changed', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('rejected', sa.BigInteger(), server_default='0', nullable=False),
        sa.Column('batches_done', sa.Integer(), server_default='0', nullable=False),
        sa.Column('batch_size', sa.Integer(), nullable=True),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        sa.Column('max_attempts', sa.Integer(), server_default='5', nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('last_error_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('seconds_running', sa.Float(), server_default='0', nullable=False),
        sa.Column('seconds_paused', sa.Float(), server_default='0', nullable=False),
        sa.Column('seconds_throttled', sa.Float(), server_default='0', nullable=False),
        sa.Column('longest_batch_seconds', sa.Float(), server_default='0', nullable=False),
        sa.Column('verify_remaining', sa.BigInteger(), nullable=True),
        sa.Column('job_id', sa.UUID(), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('changed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.CheckConstraint(f"status IN ({MIGRATION_STATUSES})",
                           name=op.f('ck_data_migrations_status')),
        sa.CheckConstraint('rows_done >= 0 AND attempts >= 0',
                           name=op.f('ck_data_migrations_counts')),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_data_migrations')),
    )
    op.create_table(
        'data_migration_batches',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('migration', sa.String(length=100), nullable=False),
        sa.Column('run_no', sa.Integer(), nullable=False),
        sa.Column('batch_no', sa.Integer(), nullable=False),
        sa.Column('lower_id', sa.BigInteger(), nullable=True),
        sa.Column('upper_id', sa.BigInteger(), nullable=True),
        sa.Column('size', sa.Integer(), nullable=False),
        sa.Column('rows_changed', sa.Integer(), server_default='0', nullable=False),
        sa.Column('rejected', sa.Integer(), server_default='0', nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='1', nullable=False),
        sa.Column('seconds', sa.Float(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('job_id', sa.UUID(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.CheckConstraint("status IN ('succeeded', 'split', 'retrying', 'failed')",
                           name=op.f('ck_data_migration_batches_status')),
        sa.ForeignKeyConstraint(['migration'], ['data_migrations.name'],
                                name=op.f('fk_data_migration_batches_migration_data_migrations'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_data_migration_batches')),
    )
    op.create_index('ix_data_migration_batches_migration', 'data_migration_batches',
                    ['migration', 'id'])
    op.create_table(
        'data_migration_pauses',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('migration', sa.String(length=100), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('actor', sa.String(length=100), nullable=True),
        sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('seconds', sa.Float(), nullable=True),
        sa.Column('job_id', sa.UUID(), nullable=True),
        sa.CheckConstraint("kind IN ('operator', 'throttle')",
                           name=op.f('ck_data_migration_pauses_kind')),
        sa.ForeignKeyConstraint(['migration'], ['data_migrations.name'],
                                name=op.f('fk_data_migration_pauses_migration_data_migrations'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_data_migration_pauses')),
    )
    op.create_index('ix_data_migration_pauses_migration', 'data_migration_pauses',
                    ['migration', 'id'])
    op.create_table(
        'data_migration_rejects',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('migration', sa.String(length=100), nullable=False),
        sa.Column('run_no', sa.Integer(), nullable=False),
        sa.Column('row_id', sa.BigInteger(), nullable=False),
        sa.Column('position', sa.Integer(), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('record', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.ForeignKeyConstraint(['migration'], ['data_migrations.name'],
                                name=op.f('fk_data_migration_rejects_migration_data_migrations'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_data_migration_rejects')),
        sa.UniqueConstraint('migration', 'row_id', 'position',
                            name='uq_data_migration_rejects_row'),
    )
    op.execute(TRY_TIMESTAMPTZ)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS warden_try_timestamptz(text)")
    op.drop_table('data_migration_rejects')
    op.drop_index('ix_data_migration_pauses_migration', table_name='data_migration_pauses')
    op.drop_table('data_migration_pauses')
    op.drop_index('ix_data_migration_batches_migration', table_name='data_migration_batches')
    op.drop_table('data_migration_batches')
    op.drop_table('data_migrations')
    for name, _, _ in reversed(LEDGER_GUARDS):
        op.drop_index(name, table_name='xp_ledger')
