"""job events: lapsed runs timed to their lease, rows born final counted, a resumed parent
due from its resumption

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 14:30:00

Why (found in review of issue 9's metrics):
- A run whose owner died (SIGKILL, OOM, a lost host) ends when another process records it:
  a singleton fenced to `retrying` (lease_lapsed), `dead` (worker_lost), an unknown type
  taken over. Its run time was counted to that moment, hours after its worker was gone;
  it is now counted to its lease's expiry at most (a live run's lease is always ahead of
  the clock, so a run that ends normally is timed as before).
- A message adopted with params that are no object is INSERTed already `failed`; the
  trigger fired on UPDATE only, so that outcome was never counted.
- The last child to end puts its waiting parent back in the queue with no due time, so the
  queue's oldest age (due = COALESCE(next_attempt_at, not_before, created_at)) read the
  parent's whole life, children included, as time spent waiting in the queue. It is now
  due from when it was put back.
"""
import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

EVENT_TRIGGER = """
CREATE OR REPLACE FUNCTION warden_job_event() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- a row born final (trigger WHEN): its outcome, with no run or wait to time
        INSERT INTO job_events (type, status, error_code, attempts)
        VALUES (NEW.type, NEW.status, NEW.error_code,
                CASE WHEN NEW.status <> 'retrying' THEN NEW.attempts END);
        RETURN NULL;
    END IF;
    IF NEW.status = 'running' THEN
        -- a claim: how long the job waited from when it was due (not a parent resumed by
        -- its children: its due time is when its last child ended, not a wait it had)
        IF OLD.status IN ('queued', 'retrying') AND OLD.children_total = 0 THEN
            INSERT INTO job_events (type, status, wait_seconds)
            VALUES (NEW.type, 'running', GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp()
                    - COALESCE(OLD.next_attempt_at, OLD.not_before, OLD.created_at))));
        END IF;
    ELSIF NEW.status IN ('succeeded', 'failed', 'dead', 'cancelled', 'retrying') THEN
        -- a run ends at its outcome, or at its lease's expiry when that is earlier: its
        -- owner stopped heartbeating then (it died), and another process records it later
        INSERT INTO job_events (type, status, error_code, run_seconds, attempts, entry)
        VALUES (NEW.type, NEW.status, NEW.error_code,
                CASE WHEN OLD.status = 'running' AND OLD.started_at IS NOT NULL
                     THEN GREATEST(0, EXTRACT(EPOCH FROM LEAST(clock_timestamp(),
                          COALESCE(OLD.lease_expires_at, clock_timestamp())) - OLD.started_at))
                END,
                CASE WHEN NEW.status <> 'retrying' THEN NEW.attempts END,
                CASE WHEN NEW.status = 'succeeded' AND NEW.source = 'beat'
                     THEN split_part(NEW.idempotency_key, ':', 1) END);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
"""

FINAL = "('succeeded','failed','dead','cancelled')"
# 0002's function, and the resumed parent is due from clock_timestamp() (the child's
# outcome may commit in a family transaction whose now() is when it began).
CHILD_TRIGGER = f"""
CREATE OR REPLACE FUNCTION warden_child_status() RETURNS trigger AS $$
BEGIN
    IF NEW.status IN {FINAL} AND OLD.status NOT IN {FINAL} THEN
        UPDATE job_runs SET
            children_pending = children_pending - 1,
            status = CASE WHEN children_pending = 1 AND status = 'waiting'
                          THEN 'queued' ELSE status END,
            next_attempt_at = CASE WHEN children_pending = 1 AND status = 'waiting'
                                   THEN clock_timestamp() ELSE next_attempt_at END,
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


def _previous(name: str) -> ModuleType:
    path = Path(__file__).with_name(name)
    spec = importlib.util.spec_from_file_location(f"warden_migration_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    op.execute(EVENT_TRIGGER)
    op.execute(
        "CREATE TRIGGER trg_job_runs_event_insert AFTER INSERT ON job_runs "
        f"FOR EACH ROW WHEN (NEW.status IN {FINAL}) EXECUTE FUNCTION warden_job_event()"
    )
    op.execute(CHILD_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS trg_job_runs_event_insert ON job_runs")
    op.execute(_previous("0006_job_stats.py").EVENT_TRIGGER)
    op.execute(_previous("0002_job_ownership.py").CHILD_TRIGGER)
