"""`python -m bench`: start the servers, run each bench, print one result line per bench."""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _terminate(signum: int, _: FrameType | None) -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` stops its processes."""
    raise SystemExit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    n = _env_int("WARDEN_BENCH_N", 2000)
    concurrency = _env_int("WARDEN_BENCH_CONCURRENCY", 2)
    clients = _env_int("WARDEN_BENCH_CLIENTS", 16)
    duration = _env_float("WARDEN_BENCH_DURATION", 10.0)
    rounds = _env_int("WARDEN_BENCH_ROUNDS", 2)
    # migration_batched (bench/migration_batched.py): the 1M legacy rows; xp_award
    # (bench/xp_award.py): awards queued for the worker, pgbench's default run for this long
    migration_rows = _env_int("WARDEN_BENCH_MIGRATION_ROWS", 1_000_000)
    xp_scenes = _env_int("WARDEN_BENCH_XP_SCENES", 2000)
    pgbench_seconds = _env_float("WARDEN_BENCH_PGBENCH_SECONDS", 10.0)
    only = os.environ.get("WARDEN_BENCH_ONLY", "")
    # backup/verify (bench/backup.py, bench/verify.py): the 1M-character data set
    backup_characters = _env_int("WARDEN_BENCH_BACKUP_CHARACTERS", 1_000_000)
    backup_rounds = _env_int("WARDEN_BENCH_BACKUP_ROUNDS", 2)
    # audit_scan, audit_vs_naive, validation_incremental (bench/audit.py, bench/validation.py):
    # one 1M-character data set for the three (WARDEN_BENCH_AUDIT_VIOLATIONS: see audit.py)
    audit_characters = _env_int("WARDEN_BENCH_AUDIT_CHARACTERS", 1_000_000)
    audit_rounds = _env_int("WARDEN_BENCH_AUDIT_ROUNDS", 3)
    validation_rounds = _env_int("WARDEN_BENCH_VALIDATION_ROUNDS", 1)
    # metrics_scrape (bench/metrics_scrape.py): the 10M job rows
    metrics_rows = _env_int("WARDEN_BENCH_METRICS_ROWS", 10_000_000)

    from bench import enqueue_api, phases, ping
    from bench.services import services
    from workers import logging as wlogging

    # As the CLI does: warnings only, on stderr; stdout carries the results.
    wlogging.configure("WARNING")

    print(f"# warden bench: {os.cpu_count()} CPUs shared by Postgres, Redis, the servers, "
          "the worker and the load generator (all on this host)", flush=True)
    started = time.monotonic()
    with services() as svc:
        if only in ("", "ping"):
            for line in ping.run(svc, n, concurrency, rounds):
                print(line, flush=True)
            for line in phases.run(svc):
                print(line, flush=True)
        if only in ("", "migration"):
            from bench import migration_batched

            for line in migration_batched.run(svc, migration_rows):
                print(line, flush=True)
        if only in ("", "xp"):
            from bench import xp_award

            for line in xp_award.run(svc, xp_scenes, concurrency, pgbench_seconds):
                print(line, flush=True)
        if only in ("", "api"):
            for line in enqueue_api.run(svc, clients, duration, rounds):
                print(line, flush=True)
        if only in ("", "backup"):
            from bench import backup, verify

            for line in backup.run(svc, backup_characters, backup_rounds):
                print(line, flush=True)
            try:
                for line in verify.run(svc, backup_rounds):
                    print(line, flush=True)
            finally:
                backup.stop_worker()
        if only in ("", "audit"):
            from bench import audit, validation

            with audit.dataset(svc, audit_characters) as data:
                for line in audit.run(data, audit_rounds):
                    print(line, flush=True)
                for line in validation.run(svc, data, validation_rounds):
                    print(line, flush=True)
        if only in ("", "metrics"):
            from bench import metrics_scrape

            for line in metrics_scrape.run(svc, metrics_rows):
                print(line, flush=True)
    print(f"# done in {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("# interrupted; every process was stopped", file=sys.stderr)
        sys.exit(130)
