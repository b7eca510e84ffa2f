"""integrity audits, character validation and health reports

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 20:20:00

Tables of tasks/audits, tasks/validation and tasks/reports (their models.py say why each
exists). Value lists in CHECK constraints are frozen copies of the models' at this
revision (migrations are history).
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def _ts(name, nullable=True, default=False):
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable,
                     server_default=sa.text('now()') if default else None)


def upgrade() -> None:
    op.create_table(
        'audit_runs',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('job_id', sa.UUID(), nullable=True),
        sa.Column('mode', sa.String(length=8), nullable=False),
        sa.Column('checks', postgresql.ARRAY(sa.String(length=40)), nullable=False),
        sa.Column('rules_version', sa.String(length=32), nullable=False),
        _ts('started_at', nullable=False),
        _ts('finished_at', nullable=False, default=True),
        sa.Column('findings', sa.Integer(), server_default='0', nullable=False),
        sa.Column('reports', sa.Integer(), server_default='0', nullable=False),
        sa.Column('fixed', sa.Integer(), server_default='0', nullable=False),
        sa.Column('remaining', sa.Integer(), server_default='0', nullable=False),
        sa.Column('changed_rows', sa.Integer(), server_default='0', nullable=False),
        sa.Column('totals', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        _ts('undone_at'),
        sa.Column('undone_by', sa.String(length=100), nullable=True),
        sa.Column('undo', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.CheckConstraint("mode IN ('check', 'fix')", name=op.f('ck_audit_runs_mode')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_runs')),
    )
    op.create_index('uq_audit_runs_job_id', 'audit_runs', ['job_id'], unique=True,
                    postgresql_where=sa.text('job_id IS NOT NULL'))
    op.create_index('ix_audit_runs_started', 'audit_runs', ['started_at'])

    op.create_table(
        'audit_findings',
        sa.Column('run_id', sa.BigInteger(), nullable=False),
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('check_name', sa.String(length=40), nullable=False),
        sa.Column('rule', sa.String(length=64), nullable=False),
        sa.Column('level', sa.String(length=8), nullable=False),
        sa.Column('entity', sa.String(length=32), nullable=False),
        sa.Column('entity_id', sa.BigInteger(), nullable=False),
        sa.Column('field', sa.String(length=64), nullable=False),
        sa.Column('value', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('expected', sa.Text(), nullable=False),
        sa.Column('fix', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('fixable', sa.Boolean(), nullable=False),
        sa.Column('outcome', sa.String(length=24), nullable=True),
        sa.CheckConstraint("level IN ('finding', 'report')", name=op.f('ck_audit_findings_level')),
        sa.CheckConstraint("outcome IS NULL OR outcome IN ('fixed', 'resolved_meanwhile', "
                           "'blocked', 'gone', 'unfixable')",
                           name=op.f('ck_audit_findings_outcome')),
        # No foreign key to audit_runs: its per-row check doubled the cost of storing a
        # run's findings (~450K on the 5% demo set, bench/audit.py). Findings are written
        # only in their run's transaction; whatever deletes a run (no retention job does
        # yet) deletes its findings with it.
        # One index: it pages a run's findings by (check, id), all or one check's. A second
        # one (by id alone) cost another third on storing them.
        sa.PrimaryKeyConstraint('run_id', 'check_name', 'id', name=op.f('pk_audit_findings')),
    )

    op.create_table(
        'audit_changes',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('run_id', sa.BigInteger(), nullable=False),
        sa.Column('entity', sa.String(length=32), nullable=False),
        sa.Column('entity_id', sa.BigInteger(), nullable=False),
        sa.Column('action', sa.String(length=8), nullable=False),
        sa.Column('before', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('after', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('forced_status', sa.Boolean(), server_default='false', nullable=False),
        _ts('row_updated_at'),
        sa.Column('undo_outcome', sa.String(length=16), nullable=True),
        sa.Column('note', sa.Text(), nullable=True),
        sa.CheckConstraint("action IN ('update', 'delete')", name=op.f('ck_audit_changes_action')),
        sa.CheckConstraint("undo_outcome IS NULL OR undo_outcome IN ('reverted', 'changed_since')",
                           name=op.f('ck_audit_changes_undo_outcome')),
        sa.ForeignKeyConstraint(['run_id'], ['audit_runs.id'], ondelete='CASCADE',
                                name=op.f('fk_audit_changes_run_id_audit_runs')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_changes')),
    )
    op.create_index('ix_audit_changes_run_entity', 'audit_changes',
                    ['run_id', 'entity', 'entity_id'])

    op.create_table(
        'validation_sweeps',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('job_id', sa.UUID(), nullable=True),
        sa.Column('mode', sa.String(length=16), nullable=False),
        sa.Column('character_ids', postgresql.ARRAY(sa.BigInteger()), nullable=True),
        sa.Column('status', sa.String(length=16), server_default='running', nullable=False),
        sa.Column('plan', sa.String(length=8), nullable=False),
        sa.Column('rules_version', sa.String(length=32), nullable=False),
        _ts('scan_from', nullable=False),
        _ts('since'),
        _ts('started_at', nullable=False, default=True),
        _ts('finished_at'),
        sa.Column('chunks', sa.Integer(), server_default='0', nullable=False),
        sa.Column('totals', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.CheckConstraint("mode IN ('full', 'incremental')", name=op.f('ck_validation_sweeps_mode')),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed')",
                           name=op.f('ck_validation_sweeps_status')),
        sa.CheckConstraint("plan IN ('inline', 'fanout')", name=op.f('ck_validation_sweeps_plan')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_validation_sweeps')),
    )
    op.create_index('uq_validation_sweeps_job_id', 'validation_sweeps', ['job_id'], unique=True,
                    postgresql_where=sa.text('job_id IS NOT NULL'))
    op.create_index('ix_validation_sweeps_watermark', 'validation_sweeps',
                    ['rules_version', 'scan_from'],
                    postgresql_where=sa.text("status = 'succeeded' AND character_ids IS NULL"))

    op.create_table(
        'validation_issues',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('character_id', sa.BigInteger(), nullable=False),
        sa.Column('rule', sa.String(length=64), nullable=False),
        sa.Column('subject', sa.String(length=100), nullable=False),
        sa.Column('severity', sa.String(length=8), nullable=False),
        sa.Column('message', sa.Text(), nullable=False),
        _ts('first_seen', nullable=False),
        _ts('last_seen', nullable=False),
        _ts('resolved_at'),
        sa.Column('first_sweep_id', sa.BigInteger(), nullable=True),
        sa.Column('last_sweep_id', sa.BigInteger(), nullable=True),
        sa.Column('resolved_sweep_id', sa.BigInteger(), nullable=True),
        sa.CheckConstraint("severity IN ('error', 'warning')",
                           name=op.f('ck_validation_issues_severity')),
        sa.ForeignKeyConstraint(['character_id'], ['characters.id'], ondelete='CASCADE',
                                name=op.f('fk_validation_issues_character_id_characters')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_validation_issues')),
    )
    op.create_index('uq_validation_issues_open', 'validation_issues',
                    ['character_id', 'rule', 'subject'], unique=True,
                    postgresql_where=sa.text('resolved_at IS NULL'))
    op.create_index('ix_validation_issues_character', 'validation_issues',
                    ['character_id', 'id'])

    # Validation checks xp against the sum of each character's ledger, chunk by chunk (an
    # id range): with delta in the index that is an index-only range scan. Without it every
    # chunk read nearly every heap page of xp_ledger (its rows are in insertion order, not
    # by character): ~1 s per 25,000-character chunk on 1M characters (bench/validation.py).
    op.create_index('ix_xp_ledger_character_delta', 'xp_ledger', ['character_id'],
                    postgresql_include=['delta'])

    op.create_table(
        'health_reports',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('job_id', sa.UUID(), nullable=True),
        _ts('created_at', nullable=False, default=True),
        sa.Column('period_hours', sa.Integer(), nullable=False),
        sa.Column('health_score', sa.Integer(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('report', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column('alert_state', sa.String(length=16), nullable=False),
        sa.Column('alert_job_id', sa.UUID(), nullable=True),
        sa.CheckConstraint("status IN ('healthy', 'degraded')",
                           name=op.f('ck_health_reports_status')),
        sa.CheckConstraint("alert_state IN ('none', 'not_requested', 'no_webhook', 'queued', "
                           "'delivered', 'failed')", name=op.f('ck_health_reports_alert_state')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_health_reports')),
    )
    op.create_index('uq_health_reports_job_id', 'health_reports', ['job_id'], unique=True,
                    postgresql_where=sa.text('job_id IS NOT NULL'))
    op.create_index('ix_health_reports_created', 'health_reports', ['created_at', 'id'])

    op.create_table(
        'health_alert_deliveries',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('report_id', sa.BigInteger(), nullable=False),
        sa.Column('job_id', sa.UUID(), nullable=True),
        sa.Column('attempt', sa.Integer(), nullable=False),
        _ts('at', nullable=False, default=True),
        sa.Column('target', sa.String(length=200), nullable=False),
        sa.Column('ok', sa.Boolean(), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('duration_ms', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['report_id'], ['health_reports.id'], ondelete='CASCADE',
                                name=op.f('fk_health_alert_deliveries_report_id_health_reports')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_health_alert_deliveries')),
    )
    op.create_index('ix_health_alert_deliveries_report', 'health_alert_deliveries',
                    ['report_id', 'id'])


def downgrade() -> None:
    op.drop_table('health_alert_deliveries')
    op.drop_table('health_reports')
    op.drop_table('validation_issues')
    op.drop_index('ix_xp_ledger_character_delta', table_name='xp_ledger')
    op.drop_table('validation_sweeps')
    op.drop_table('audit_changes')
    op.drop_table('audit_findings')
    op.drop_table('audit_runs')
