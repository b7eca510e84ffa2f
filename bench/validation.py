"""validation_incremental: a full validation sweep over an incremental one after 1% of the
characters changed, both as validation.characters jobs on a real worker (two pool
processes: the sweep fans out in chunks), same database, same run; and the full sweep's
characters validated per second.

Timed from submit to the job's succeeded status by the wall clock, polled every 10 ms, so
the fan-out, every chunk and the parent's second run are inside.
The 1% is one UPDATE of every 100th character (each gets a new row version and
updated_at, as any write does). The worker's watermark overlap is set to 30 s: with the
default 300 s, an incremental sweep right after seeding would re-read every character
seeded in the 5 minutes before the full sweep (and skip them through the cache, but read
them); in steady state the overlap holds only the last minutes' writes.
The data set is bench/audit.py's (`dataset`: 1,000,000 characters, seeded once per run).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bench.audit import Dataset
from bench.services import Proc, Services

OVERLAP_SECONDS = 30
CHANGED_EVERY = 100  # 1% of the characters


def start_validation_worker(svc: Services, data: Dataset, concurrency: int) -> Proc:
    """A real worker on the data set, with the bench's overlap (bench.services.start_worker
    takes no env). The caller stops it (before the data set's database is dropped)."""
    env = svc.env(WARDEN_DATABASE_URL=data.url,
                  WARDEN_VALIDATION_WATERMARK_OVERLAP=str(OVERLAP_SECONDS))
    log = svc.data_dir / f"validation-worker-{uuid.uuid4().hex[:6]}.log"
    proc = Proc(["-m", "cli.main", "worker", "-c", str(concurrency),
                 "-n", f"bench-validation-{uuid.uuid4().hex[:6]}@%h"], env, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if " ready." in proc.tail(200_000):
            return proc
        if not proc.alive():
            raise RuntimeError(f"worker exited:\n{proc.tail()}")
        time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"worker not ready after 60 s:\n{proc.tail()}")


def sweep(mode: str, timeout: float = 3600) -> tuple[float, dict[str, Any]]:
    """One validation.characters job, submit to succeeded by the wall clock (the job row's
    finished_at is its last transaction's start, not its end); (seconds, its result)."""
    from workers import jobstore
    from workers.enqueue import submit

    started = time.monotonic()
    job_id = str(submit("validation.characters", {"mode": mode}, source="bench").job["id"])
    while time.monotonic() - started < timeout:
        row = jobstore.get(job_id)
        if row is not None and row["status"] in ("succeeded", "failed", "dead", "cancelled"):
            if row["status"] != "succeeded":
                raise RuntimeError(f"sweep {job_id} {row['status']}: {row['error_code']}")
            return time.monotonic() - started, dict(row["result"])
        time.sleep(0.01)  # the incremental sweep takes well under a second: poll tightly
    raise RuntimeError(f"sweep {job_id} not finished after {timeout:.0f} s")


def change_one_percent() -> int:
    """Write every 100th character (a no-op UPDATE still gives it a new row version and
    updated_at). Rows breaking a rule are skipped: their NOT VALID constraints refuse any
    UPDATE that does not fix them, as they would a player's."""
    from sqlalchemy import text

    from domain import checks
    from workers.db import session_scope

    with session_scope() as s:
        done = s.execute(text(
            f"UPDATE characters SET concept = concept WHERE id % {CHANGED_EVERY} = 0 "
            f"AND NOT {checks.any_broken_sql(checks.CHARACTER_RULES)}"))
        return int(done.rowcount)  # type: ignore[attr-defined]


def run(svc: Services, data: Dataset, rounds: int) -> list[str]:
    """The validation_incremental line and the full sweep's rate."""
    worker = start_validation_worker(svc, data, 2)
    lines: list[str] = []
    fulls, incs = [], []
    try:
        for _ in range(rounds):
            full_s, full = sweep("full")
            changed = change_one_percent()
            inc_s, inc = sweep("incremental")
            fulls.append((full_s, full))
            incs.append((inc_s, inc, changed))
    finally:
        worker.stop()
    full_s, full = min(fulls, key=lambda f: f[0])
    inc_s, inc, changed = min(incs, key=lambda i: i[0])
    ft, it = full["totals"], inc["totals"]
    lines += [
        f"validation_incremental ratio={full_s / inc_s:.1f} (full sweep seconds over an "
        f"incremental sweep after 1% of the characters changed, same run; goal >= 20)",
        f"validation_full_rate={ft['validated'] / full_s:,.0f} characters/s (full sweep, "
        f"{full['chunks']} chunks on 2 worker processes; aim >= 20,000)",
        f"  full {full_s:.1f} s ({ft['validated']:,} validated, {sum(ft['issues'].values()):,}"
        f" issues); incremental {inc_s:.2f} s after {changed:,} changes: candidates "
        f"{it['candidates']:,}, cache hits {it['cache_hits']:,}, validated "
        f"{it['validated']:,} ({inc['plan']}); best of {rounds} round(s)",
        f"  data: {data.characters:,} characters, {data.violations:.1%} breaking each rule; "
        f"watermark overlap {OVERLAP_SECONDS} s",
    ]
    return lines
