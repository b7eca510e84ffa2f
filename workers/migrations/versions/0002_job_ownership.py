"""job ownership (epoch, owner, lease), delivery marks, fan-out, progress, operator log

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 20:15:00

Ownership moves into Postgres: the claim gives a job an owner, a lease expiry and a new
epoch; every outcome write and every fenced effect is conditional on that epoch.
Fan-out (parent/child jobs) and the operator log are core features every family shares.
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

OLD_STATUSES = "('queued','running','retrying','succeeded','failed','dead','cancelled')"
NEW_STATUSES = "('queued','running','retrying','waiting','succeeded','failed','dead','cancelled')"
FINAL = "('succeeded','failed','dead','cancelled')"
# What the gauges count: the unfinished jobs, and the dead ones (rare, and each needs an
# operator). Finished jobs are counted by counters, not by scanning millions of rows.
WATCHED = "('queued','running','retrying','waiting','dead')"
# The relay's "lost" scan orders by this (workers/relay.py _UNDELIVERED uses the same).
UNDELIVERED_KEY = "GREATEST(published_at, COALESCE(next_attempt_at, not_before, '-infinity'))"

# A child's move into or out of a final status adjusts its parent's count of unfinished
# children, whichever code path (worker, operator, SQL) made it. The last child to finish
# puts a waiting parent back in the queue (published_at NULL: the relay sends it), where
# its task runs again and reads the children's results.
CHILD_TRIGGER = f"""
CREATE OR REPLACE FUNCTION warden_child_status() RETURNS trigger AS $$
BEGIN
    IF NEW.status IN {FINAL} AND OLD.status NOT IN {FINAL} THEN
        UPDATE job_runs SET
            children_pending = children_pending - 1,
            status = CASE WHEN children_pending = 1 AND status = 'waiting'
                          THEN 'queued' ELSE status END,
            published_at = CASE WHEN children_pending = 1 AND status = 'waiting'
                                THEN NULL ELSE published_at END,
            delivered_at = CASE WHEN children_pending = 1 AND status = 'waiting'
                                THEN NULL ELSE delivered_at END
        WHERE id = NEW.parent_id;
    ELSIF OLD.status IN {FINAL} AND NEW.status NOT IN {FINAL} THEN
        -- an operator retried a finished child: its parent waits for it again. A parent
        -- running right now (adding up what it read) is fenced off: new epoch, so its
        -- outcome cannot commit; it runs again once the child has ended. A finished parent
        -- gets a fresh budget, as an operator retry gives. (SET sees the old values.)
        UPDATE job_runs SET
            children_pending = children_pending + 1,
            epoch = epoch + CASE WHEN status = 'running' THEN 1 ELSE 0 END,
            attempts = CASE WHEN status IN ('succeeded', 'failed', 'dead') THEN 0
                            WHEN status = 'running' THEN GREATEST(attempts - 1, 0)
                            ELSE attempts END,
            status = CASE WHEN status = 'cancelled' THEN status ELSE 'waiting' END,
            lease_expires_at = NULL,
            next_attempt_at = CASE WHEN status = 'cancelled' THEN next_attempt_at END,
            finished_at = CASE WHEN status = 'cancelled' THEN finished_at END
        WHERE id = NEW.parent_id AND children_total > 0;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    op.add_column('job_runs', sa.Column('epoch', sa.BigInteger(), server_default='0',
                                        nullable=False))
    op.add_column('job_runs', sa.Column('owner', sa.String(length=200), nullable=True))
    op.add_column('job_runs', sa.Column('lease_expires_at', sa.DateTime(timezone=True),
                                        nullable=True))
    op.add_column('job_runs', sa.Column('delivered_at', sa.DateTime(timezone=True),
                                        nullable=True))
    op.add_column('job_runs', sa.Column('parent_id', sa.UUID(), nullable=True))
    op.add_column('job_runs', sa.Column('children_total', sa.Integer(), server_default='0',
                                        nullable=False))
    op.add_column('job_runs', sa.Column('children_pending', sa.Integer(), server_default='0',
                                        nullable=False))
    op.add_column('job_runs', sa.Column('progress', postgresql.JSONB(astext_type=sa.Text()),
                                        nullable=True))
    op.create_foreign_key(op.f('fk_job_runs_parent_id_job_runs'), 'job_runs', 'job_runs',
                          ['parent_id'], ['id'], ondelete='CASCADE')
    op.drop_constraint(op.f('ck_job_runs_status'), 'job_runs', type_='check')
    op.create_check_constraint(op.f('ck_job_runs_status'), 'job_runs', f"status IN {NEW_STATUSES}")
    op.create_check_constraint(op.f('ck_job_runs_children'), 'job_runs',
                               'children_pending >= 0 AND children_pending <= children_total')

    # Partial indexes over the unfinished statuses: the relay's and the gauges' queries stay
    # index scans over the few unfinished rows however many finished ones the table holds
    # (docs/job-table-at-scale.md has the plans at 10M rows).
    op.drop_index('ix_job_runs_unpublished', table_name='job_runs')
    op.create_index('ix_job_runs_unpublished', 'job_runs', ['updated_at'],
                    postgresql_where=sa.text(
                        "published_at IS NULL AND status IN ('queued','retrying')"))
    # Keyed by when the job became due for delivery (the later of its publish and its due
    # time), so the relay's "lost" scan skips countdowns and backoffs not yet due instead of
    # filtering them row by row (a retry storm: 22 ms -> 0.5 ms, docs/job-table-at-scale.md).
    op.execute(
        f"CREATE INDEX ix_job_runs_undelivered ON job_runs ({UNDELIVERED_KEY}) "
        "WHERE delivered_at IS NULL AND published_at IS NOT NULL "
        "AND status IN ('queued','retrying')")
    # Vacuum job_runs by a fixed number of changed rows, not 20% of the table: at 10M rows the
    # default waits for ~2M changes, and the partial indexes and the gauge's index-only scan
    # degrade meanwhile (1.3 s instead of 0.1 s in the measured backlog).
    op.execute(
        "ALTER TABLE job_runs SET (autovacuum_vacuum_scale_factor = 0.01, "
        "autovacuum_vacuum_threshold = 10000, autovacuum_vacuum_insert_scale_factor = 0.01, "
        "autovacuum_vacuum_insert_threshold = 10000, autovacuum_analyze_scale_factor = 0.01, "
        "autovacuum_analyze_threshold = 10000)")
    op.create_index('ix_job_runs_running_lease', 'job_runs', ['lease_expires_at'],
                    postgresql_where=sa.text("status = 'running'"))
    op.create_index('ix_job_runs_unfinished', 'job_runs', ['status', 'type', 'created_at'],
                    postgresql_where=sa.text(f"status IN {WATCHED}"))
    op.create_index('ix_job_runs_parent', 'job_runs', ['parent_id', 'created_at'],
                    postgresql_where=sa.text("parent_id IS NOT NULL"))

    # Rows running before this revision get a lapsed lease: the relay re-sends them and a
    # worker takes them over (their old owners knew nothing of epochs).
    op.execute("UPDATE job_runs SET lease_expires_at = now() WHERE status = 'running'")
    op.execute(CHILD_TRIGGER)
    op.execute(
        "CREATE TRIGGER trg_job_runs_child_status AFTER UPDATE OF status ON job_runs "
        "FOR EACH ROW WHEN (NEW.parent_id IS NOT NULL AND OLD.status IS DISTINCT FROM "
        "NEW.status) EXECUTE FUNCTION warden_child_status()"
    )

    op.create_table(
        'operator_log',
        sa.Column('id', sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.Column('actor', sa.String(length=100), nullable=False),
        sa.Column('action', sa.String(length=64), nullable=False),
        sa.Column('target', sa.String(length=200), nullable=True),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('count', sa.Integer(), server_default='0', nullable=False),
        sa.Column('details', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_operator_log')),
    )
    op.create_index('ix_operator_log_at', 'operator_log', ['at'])


def downgrade() -> None:
    op.drop_index('ix_operator_log_at', table_name='operator_log')
    op.drop_table('operator_log')
    op.execute("DROP TRIGGER IF EXISTS trg_job_runs_child_status ON job_runs")
    op.execute("DROP FUNCTION IF EXISTS warden_child_status()")
    op.drop_index('ix_job_runs_parent', table_name='job_runs')
    op.drop_index('ix_job_runs_unfinished', table_name='job_runs')
    op.drop_index('ix_job_runs_running_lease', table_name='job_runs')
    op.execute("ALTER TABLE job_runs RESET (autovacuum_vacuum_scale_factor, "
               "autovacuum_vacuum_threshold, autovacuum_vacuum_insert_scale_factor, "
               "autovacuum_vacuum_insert_threshold, autovacuum_analyze_scale_factor, "
               "autovacuum_analyze_threshold)")
    op.drop_index('ix_job_runs_undelivered', table_name='job_runs')
    op.drop_index('ix_job_runs_unpublished', table_name='job_runs')
    op.create_index('ix_job_runs_unpublished', 'job_runs', ['created_at'],
                    postgresql_where=sa.text("published_at IS NULL AND status = 'queued'"))
    op.drop_constraint(op.f('ck_job_runs_children'), 'job_runs', type_='check')
    op.drop_constraint(op.f('ck_job_runs_status'), 'job_runs', type_='check')
    op.execute("UPDATE job_runs SET status = 'queued' WHERE status = 'waiting'")
    op.create_check_constraint(op.f('ck_job_runs_status'), 'job_runs', f"status IN {OLD_STATUSES}")
    op.drop_constraint(op.f('fk_job_runs_parent_id_job_runs'), 'job_runs', type_='foreignkey')
    for col in ('progress', 'children_pending', 'children_total', 'parent_id',
                'delivered_at', 'lease_expires_at', 'owner', 'epoch'):
        op.drop_column('job_runs', col)
