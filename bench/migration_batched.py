"""migration_batched: the legacy spent_xp migration in batches vs the same transform as one
SQL statement, on the same rows, same server, same run.

The anchor runs the migration's own transform once over every key (one statement, one
transaction: the fastest way there is, and the one that locks every row until the end).
The batched run is `service.run` as the worker runs it (adaptive batch size, a checkpoint
and a batch record per transaction, the health checks before each batch, verify at the
end), in this process with plain transactions instead of the job core's fenced ones (one
more statement per batch). Goal: ratio <= 3, and no batch holding its row locks 1 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from sqlalchemy import text

from bench.services import Services
from tasks.data_migrations import service, spent_xp
from tasks.data_migrations.registry import Batch, Context
from workers.db import session_scope

# Characters carrying legacy records; each has two (one of each DOMAIN.md shape), so the
# transform parses 2 JSON records and writes 2 request rows per character.
SEED_SQL = """
    INSERT INTO characters (id, name, owner_id, chronicle_id, created_at, spent_xp)
    SELECT x.id, 'bench ' || x.g, 1 + x.g / 3, 1 + x.g / 40, now() - interval '400 days',
           jsonb_build_array(
               jsonb_build_object('index', 0, 'trait', 'Strength', 'value', 'strength',
                                  'cost', 4 * (1 + x.g % 3), 'category', 'attribute',
                                  'approved', (ARRAY['Approved', 'Pending', 'Denied'])[1 + x.g % 3],
                                  'timestamp', now() - interval '300 days'),
               jsonb_build_object('index', x.id || '_ability_brawl_' || (2 + x.g % 3),
                                  'trait', 'Brawl', 'value', 2 + x.g % 3,
                                  'cost', 2 * (1 + x.g % 3), 'approved', 'Approved'))
    FROM (SELECT nextval(pg_get_serial_sequence('characters', 'id')) AS id, g
          FROM generate_series(1, :n) g) x
"""


def _sql(statement: str, **args: object) -> float:
    """Run one statement in its own transaction; its wall time (through COMMIT)."""
    started = time.perf_counter()
    with session_scope() as s:
        s.execute(text(statement), args)
    return time.perf_counter() - started


def _reset(svc: Services) -> None:
    """Empty what the migration writes, and flush dirty pages, so each run starts alike."""
    svc.sql("TRUNCATE xp_spend_requests, data_migrations CASCADE")
    svc.sql("VACUUM ANALYZE characters")
    svc.sql("CHECKPOINT")


def run(svc: Services, rows: int) -> Iterator[str]:
    """Yield the result lines."""
    svc.sql("TRUNCATE characters, scenes, data_migrations CASCADE")
    seeded = _sql(SEED_SQL, n=rows)
    yield f"# migration_batched: {rows:,} legacy characters seeded in {seeded:.0f} s"
    _reset(svc)
    _sql("SELECT count(*) FROM characters WHERE spent_xp IS NOT NULL")  # warm the cache

    # anchor: the same transform over every key at once
    started = time.perf_counter()
    with session_scope() as s:
        service.ensure_state(s, spent_xp.NAME)
        upper = int(s.execute(text("SELECT max(id) FROM characters")).scalar_one())
        outcome = spent_xp.transform(s, Context(spent_xp.NAME, 1), Batch(None, upper, rows))
    single = time.perf_counter() - started
    assert (outcome.changed, outcome.rejected) == (2 * rows, 0), outcome

    _reset(svc)
    started = time.perf_counter()
    result = service.run(spent_xp.NAME)
    batched = time.perf_counter() - started
    assert result["status"] == "succeeded" and result["changed"] == 2 * rows, result
    with session_scope() as s:
        sizes = s.execute(text(
            "SELECT min(size), max(size), percentile_cont(0.5) WITHIN GROUP (ORDER BY size) "
            "FROM data_migration_batches WHERE migration = :n AND status = 'succeeded'"),
            {"n": spent_xp.NAME}).one()
    yield (f"migration_batched ratio={batched / single:.2f} (batched migration {batched:.1f} s "
           f"over the same transform as one statement {single:.1f} s, {rows:,} legacy rows, "
           f"{2 * rows:,} records; goal <= 3)")
    yield (f"# migration_batched: longest row-lock hold of any batch "
           f"{result['longest_batch_seconds']:.3f} s (goal < 1 s); {result['batches']} batches "
           f"of {sizes[0]}..{sizes[1]} rows (median {sizes[2]:.0f}); "
           f"{rows / result['seconds_running']:,.0f} rows/s while running; verify included")
    svc.sql("TRUNCATE characters, scenes, data_migrations CASCADE")
