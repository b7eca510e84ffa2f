"""audit_scan and audit_vs_naive: the integrity audit against a plain scan and against the
seed tool's way, on the same seeded database in the same run.

- audit_scan: one full audit in check mode (tasks.audits.service.run_audit: the scans, the
  findings stored, the totals; rolled back afterwards so rounds do not pile up findings)
  over one plain full scan of the same tables: `SELECT count(*)` of characters, scenes
  and st_relationships in one statement, with index-only scans off (an index-only count
  reads the visibility map, not the rows, so it would not be a scan of the tables).
- audit_vs_naive: the seed tool's validate_data_integrity, one query per check per column
  (each rule of domain.checks as its own SELECT of the offending ids and values, the
  duplicate triples by GROUP BY, the scene flags one query each) over the same audit.

Alternating order (ABBA), medians; a warm-up of each first, so cache warmth falls on all.

The data set (shared with bench/validation.py): 1,000,000 characters from domain.demo.seed
with WARDEN_BENCH_AUDIT_VIOLATIONS of the rows breaking each rule (default 0.1%: ~9,300
findings, a legacy share; the demo default of 5% breaks 46% of all characters, ~464,000
findings, and then the run measures mostly how fast Postgres stores findings). At the
demo default it is bench/backup.py's data set (seeded once per run, shared); at any other
share a database of its own on the bench server, seeded once per run and dropped after.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bench.services import Services

DEFAULT_VIOLATIONS = 0.001


@dataclass(frozen=True)
class Dataset:
    url: str
    characters: int
    violations: float
    seconds: float  # spent seeding in this run (0: reused)


@contextlib.contextmanager
def dataset(svc: Services, characters: int) -> Iterator[Dataset]:
    """The audit and validation benches' data, this process pointed at it while they run."""
    from bench.backup import ensure_dataset
    from bench.services import _drop_database, _scratch_database
    from domain import demo

    violations = float(os.environ.get("WARDEN_BENCH_AUDIT_VIOLATIONS", DEFAULT_VIOLATIONS))
    if violations == demo.DEMO_VIOLATIONS:
        data = ensure_dataset(characters)
        yield Dataset(svc.database_url, data["characters"], violations, data["seconds"])
        return
    url, admin, name = _scratch_database(svc.database_url)
    try:
        with _pointed_at(url):
            from sqlalchemy import text

            from workers.db import session_scope
            from workers.migrate import upgrade

            upgrade(url=url)
            started = time.monotonic()
            demo.seed(characters, violations=violations)
            with session_scope() as s:
                s.execute(text("ANALYZE"))
            yield Dataset(url, characters, violations, time.monotonic() - started)
    finally:
        _drop_database(admin, name)


@contextlib.contextmanager
def _pointed_at(url: str) -> Iterator[None]:
    from workers.db import reset_engine
    from workers.settings import get_settings

    saved = os.environ.get("WARDEN_DATABASE_URL")
    os.environ["WARDEN_DATABASE_URL"] = url
    get_settings.cache_clear()
    reset_engine()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WARDEN_DATABASE_URL", None)
        else:
            os.environ["WARDEN_DATABASE_URL"] = saved
        get_settings.cache_clear()
        reset_engine()

ANCHOR = ("SELECT (SELECT count(*) FROM characters) + (SELECT count(*) FROM scenes) "
          "+ (SELECT count(*) FROM st_relationships)")


def scan_seconds() -> float:
    """One plain full scan of the audited tables (rows read, not an index-only count)."""
    from sqlalchemy import text

    from workers.db import session_scope

    with session_scope() as s:
        s.execute(text("SET LOCAL enable_indexonlyscan = off"))
        started = time.perf_counter()
        s.execute(text(ANCHOR)).scalar_one()
        return time.perf_counter() - started


def audit_seconds() -> tuple[float, dict[str, Any]]:
    """One full audit in check mode, then rolled back: (seconds, the run it stored)."""
    from sqlalchemy.orm import Session

    from tasks.audits import service
    from workers.db import get_engine

    with Session(get_engine()) as s:
        started = time.perf_counter()
        run = service.run_audit(s)
        seconds = time.perf_counter() - started
        s.rollback()
    return seconds, run


def naive_seconds() -> tuple[float, int]:
    """The seed tool's way: one query per check per column; (seconds, rows found)."""
    from sqlalchemy import text

    from domain import checks, rules
    from workers.db import session_scope

    found = 0
    key = ", ".join(rules.ST_RELATIONSHIP_KEY)
    with session_scope() as s:
        started = time.perf_counter()
        for r in checks.CHARACTER_RULES:
            found += len(s.execute(text(
                f"SELECT id, {r.field} FROM characters WHERE {r.sql}")).all())
        for scene in checks.SCENE_RULES:
            found += len(s.execute(text(
                f"SELECT id FROM scenes WHERE {scene.sql}")).all())
        found += len(s.execute(text(
            f"SELECT s.id FROM st_relationships s JOIN (SELECT {key}, min(id) AS keep "
            f"FROM st_relationships GROUP BY {key} HAVING count(*) > 1) d USING ({key}) "
            "WHERE s.id <> d.keep")).all())
        return time.perf_counter() - started, found


def run(data: Dataset, rounds: int) -> list[str]:
    """The audit_scan and audit_vs_naive lines, with their details (in-process: the audit
    is SQL; no worker or API takes part)."""
    scan_seconds()
    audit_seconds()
    naive_seconds()
    scans: list[float] = []
    audits: list[float] = []
    naives: list[float] = []
    run_info: dict[str, Any] = {}
    naive_found = 0
    for r in range(rounds):
        order = ("scan", "audit", "naive") if r % 2 == 0 else ("naive", "audit", "scan")
        for kind in order:
            if kind == "scan":
                scans.append(scan_seconds())
            elif kind == "audit":
                seconds, run_info = audit_seconds()
                audits.append(seconds)
            else:
                seconds, naive_found = naive_seconds()
                naives.append(seconds)
    a, s, n = statistics.median(audits), statistics.median(scans), statistics.median(naives)
    findings = run_info.get("findings", 0) + run_info.get("reports", 0)
    return [
        f"audit_scan ratio={a / s:.2f} (full audit seconds over one plain full scan of "
        f"characters, scenes and st_relationships, seq-scan count(*), same run; goal <= 1.5)",
        f"audit_vs_naive ratio={n / a:.2f} (one query per check per column, the seed tool's "
        f"way, over the full audit, same run; goal >= 10)",
        f"  audit {a:.2f} s ({findings:,} findings stored), scan {s:.3f} s, naive {n:.2f} s "
        f"({len(naives) and naive_found:,} rows fetched by "
        f"{len(_naive_queries())} queries); medians of {rounds} round(s), alternating order",
        f"  data: {data.characters:,} characters, {data.violations:.1%} of them breaking "
        f"each rule (seeded in {data.seconds:.0f} s)",
    ]


def _naive_queries() -> list[str]:
    from domain import checks

    return [r.key for r in checks.CHARACTER_RULES] + [r.key for r in checks.SCENE_RULES] + [
        checks.ST_RULE]
