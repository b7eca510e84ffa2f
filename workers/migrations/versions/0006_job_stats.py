"""job statistics: an event per state change, folded into a small summary table

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 12:10:00

Why: the per-type histograms (run time, queue wait, attempts), the outcome counters and the
schedules' last successes must be right however many API, worker and beat processes run,
and cheap to scrape at 10M job rows. A trigger appends one narrow row to job_events at each
status change, in the transaction that made it (whatever code path: worker, operator,
relay, plain SQL); workers/stats.py folds the events into job_stats (a few hundred rows)
and deletes them, in one transaction, so each event counts exactly once. Appending instead
of updating a counter row keeps concurrent workers off one hot row.
"""
from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# Times come from clock_timestamp(): in a family's fenced transaction now() is when the
# transaction began, which would shorten every long job's measured run.
EVENT_TRIGGER = """
CREATE OR REPLACE FUNCTION warden_job_event() RETURNS trigger AS $$
BEGIN
    IF NEW.status = 'running' THEN
        -- a claim: how long the job waited from when it was due (not a parent resumed by
        -- its children: it was due when its last child ended, which the row does not hold)
        IF OLD.status IN ('queued', 'retrying') AND OLD.children_total = 0 THEN
            INSERT INTO job_events (type, status, wait_seconds)
            VALUES (NEW.type, 'running', GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp()
                    - COALESCE(OLD.next_attempt_at, OLD.not_before, OLD.created_at))));
        END IF;
    ELSIF NEW.status IN ('succeeded', 'failed', 'dead', 'cancelled', 'retrying') THEN
        INSERT INTO job_events (type, status, error_code, run_seconds, attempts, entry)
        VALUES (NEW.type, NEW.status, NEW.error_code,
                CASE WHEN OLD.status = 'running' AND OLD.started_at IS NOT NULL
                     THEN GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp() - OLD.started_at))
                END,
                CASE WHEN NEW.status <> 'retrying' THEN NEW.attempts END,
                CASE WHEN NEW.status = 'succeeded' AND NEW.source = 'beat'
                     THEN split_part(NEW.idempotency_key, ':', 1) END);
    END IF;
    -- 'waiting' (a parent suspended for its children) and 'queued' (an operator retry, a
    -- parent resumed) are not outcomes.
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
"""


def upgrade() -> None:
    op.create_table(
        'job_events',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('clock_timestamp()'),
                  nullable=False),
        sa.Column('type', sa.String(length=100), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('error_code', sa.String(length=100), nullable=True),
        sa.Column('run_seconds', sa.Float(), nullable=True),
        sa.Column('wait_seconds', sa.Float(), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=True),
        sa.Column('entry', sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_job_events')),
    )
    op.create_table(
        'job_stats',
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('type', sa.String(length=200), nullable=False),
        sa.Column('label', sa.String(length=200), nullable=False),
        sa.Column('value', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('kind', 'type', 'label', name=op.f('pk_job_stats')),
    )
    op.execute(EVENT_TRIGGER)
    op.execute(
        "CREATE TRIGGER trg_job_runs_event AFTER UPDATE OF status ON job_runs "
        "FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) "
        "EXECUTE FUNCTION warden_job_event()"
    )
    # A deployment that already ran its schedules keeps their last successes (one scan, once).
    op.execute(
        "INSERT INTO job_stats (kind, type, label, value) "
        "SELECT 'schedule_success', split_part(idempotency_key, ':', 1), '', "
        "EXTRACT(EPOCH FROM max(finished_at)) FROM job_runs "
        "WHERE source = 'beat' AND status = 'succeeded' AND finished_at IS NOT NULL "
        "GROUP BY 2"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS trg_job_runs_event ON job_runs")
    op.execute("DROP FUNCTION IF EXISTS warden_job_event()")
    op.drop_table('job_stats')
    op.drop_table('job_events')
