"""backup: the backup.create job over a bare `pg_dump -Fc` of the same database, same run.

Both dump the same seeded database with the same pg_dump binary, in ABBA order (bare, job,
job, bare, ...), so cache warmth and background noise fall on both alike. The job is timed
as the job core records it (job_runs started_at -> finished_at, in a real worker: the
lock, the exported snapshot, the row counts running beside pg_dump, the fsyncs, the hash,
the manifest, the row); the bare dump is `pg_dump -Fc -f <file>` timed around the process.
The job runs with verify=false, so no verification competes for the two cores.

The data set is seeded once per run (domain.demo.seed, 1,000,000 characters by default:
~6.2M rows in ~2 minutes) and shared with bench/verify.py.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.services import Proc, Services, start_worker

DEFAULT_CHARACTERS = 1_000_000  # the data set


def ensure_dataset(characters: int) -> dict[str, Any]:
    """Seed the bench database up to `characters` (once per run); rows and seconds."""
    from sqlalchemy import text

    from domain.demo import seed
    from workers.db import session_scope

    with session_scope() as s:
        have = int(s.execute(text("SELECT count(*) FROM characters")).scalar_one())
    started = time.monotonic()
    counts = seed(characters - have) if characters > have else {}
    with session_scope() as s:
        s.execute(text("ANALYZE"))
    return {"characters": max(have, characters), "seeded_rows": sum(
        v for k, v in counts.items() if not k.startswith("violations.")),
        "seconds": time.monotonic() - started}


def wait_job(job_id: str, timeout: float = 3600) -> dict[str, Any]:
    """Until the job has ended; its row (raises unless it succeeded)."""
    from workers import jobstore

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = jobstore.get(job_id)
        if row is not None and row["status"] in ("succeeded", "failed", "dead", "cancelled"):
            if row["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} {row['status']}: {row['error_code']} "
                                   f"{row['error_message']}")
            return dict(row)
        time.sleep(0.2)
    raise RuntimeError(f"job {job_id} not finished after {timeout:.0f} s")


def job_seconds(row: dict[str, Any]) -> float:
    return float((row["finished_at"] - row["started_at"]).total_seconds())


def bare_dump() -> tuple[float, int]:
    """`pg_dump -Fc -f <file>` of the application database: (seconds, bytes)."""
    from tasks.backups.pgtools import find_tools, server_version
    from tasks.backups.service import app_target, run_tool

    target = app_target()
    with target.connect() as conn:
        num, _ = server_version(conn)
    tools = find_tools(num // 10000)
    with tempfile.TemporaryDirectory(prefix="warden-bench-dump-") as tmp:
        out = Path(tmp) / "bare.dump"
        code, stderr, seconds = run_tool(
            [tools.path("pg_dump"), "-Fc", f"--file={out}", "--no-password",
             f"--dbname={target.conninfo()}"], target)
        if code != 0:
            raise RuntimeError(f"bare pg_dump failed: {stderr}")
        return seconds, out.stat().st_size


def job_dump() -> tuple[float, float, dict[str, Any]]:
    """One backup.create job: (job seconds, submit-to-done seconds, its result)."""
    from workers.enqueue import submit

    started = time.monotonic()
    sub = submit("backup.create", {"verify": False}, source="bench")
    row = wait_job(str(sub.job["id"]))
    return job_seconds(row), time.monotonic() - started, dict(row["result"])


_worker: Proc | None = None


def stop_worker() -> None:
    """Stop the worker run() started (bench/verify.py used it too)."""
    global _worker
    if _worker is not None:
        _worker.stop()
        _worker = None


def run(svc: Services, characters: int, rounds: int) -> list[str]:
    """The backup ratio line and its details."""
    data = ensure_dataset(characters)
    # Kept for bench/verify.py, then stopped by __main__ (stop_worker): a worker left
    # running on this database would take the later benches' messages from the shared
    # queue (its claims find no row there and adopt them in the wrong database).
    global _worker
    _worker = start_worker(svc, 1)
    bare: list[float] = []
    ours: list[float] = []
    walls: list[float] = []
    size = 0
    result: dict[str, Any] = {}
    bare_dump()  # warm-up (not counted): the first full read brings the tables into cache
    for r in range(rounds):
        for kind in (("bare", "job") if r % 2 == 0 else ("job", "bare")):
            if kind == "bare":
                seconds, size = bare_dump()
                bare.append(seconds)
            else:
                seconds, wall, result = job_dump()
                ours.append(seconds)
                walls.append(wall)
    b, o = statistics.median(bare), statistics.median(ours)
    per_round = ", ".join(f"{j / x:.3f}" for j, x in zip(ours, bare, strict=True))
    return [
        f"backup ratio={o / b:.3f} (backup.create job seconds over bare pg_dump -Fc seconds, "
        f"same database, same binary; goal <= 1.15)",
        f"  job {o:.1f} s (submit to succeeded {statistics.median(walls):.1f} s), bare "
        f"{b:.1f} s; medians of {rounds} round(s) in ABBA order after one warm-up dump; "
        f"per round: {per_round}",
        f"  data: {data['characters']:,} characters, {result.get('rows', 0):,} rows in "
        f"{result.get('tables', 0)} tables (seeded in {data['seconds']:.0f} s); archive "
        f"{result.get('bytes', 0) / 2**20:.0f} MiB (bare {size / 2**20:.0f} MiB)",
    ]
