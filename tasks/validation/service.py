"""Character validation: every rule of domain.checks per character, plus the cross-row
rules (xp against the XP ledger, pending spend requests), stored as issues with a lifecycle.

Plain functions taking a session; no Celery. The sweep (tasks.py) plans chunks of
characters by id range; each chunk is validated by `validate_chunk` in one transaction.

Incremental sweeps read only characters whose updated_at (bumped by a trigger on every
write) is at or after the last successful sweep's start under the same rules version,
minus WARDEN_VALIDATION_WATERMARK_OVERLAP: a writer's transaction that began before that
start commits rows stamped earlier than it, and the overlap catches them. The rows the
overlap reads again are unchanged ones, and the Redis cache skips them: an entry per
character holds the row version (xmin: it changes with every UPDATE) it was validated at,
under a key carrying the rules version, so any edit of domain/rules.py misses every entry.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import redis
import structlog
from sqlalchemy import text
from sqlalchemy.orm import Session

from domain import checks, rules
from workers.errors import JobError
from workers.redis_client import get_redis, key

log = structlog.get_logger("warden.validation")

MODES = ("full", "incremental")


class SweepNotFound(JobError):
    code = "sweep_not_found"


def cache_key(rules_version: str, character_id: int) -> str:
    """The one place a validation cache key is spelled (under the platform's key prefix)."""
    return key(f"validation:{rules_version}:{character_id}")


@dataclass
class ChunkResult:
    """What one chunk did. `verdicts` (character id, row version) are cached after the
    chunk's transaction commits, never before (a rolled-back chunk must not be skipped)."""

    candidates: int = 0
    cache_hits: int = 0
    validated: int = 0
    issues: Counter[str] = field(default_factory=Counter)  # by severity, validated chars
    by_rule: Counter[str] = field(default_factory=Counter)
    opened: int = 0
    resolved: int = 0
    verdicts: list[tuple[int, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "cache_hits": self.cache_hits,
                "validated": self.validated, "issues": dict(self.issues),
                "by_rule": dict(sorted(self.by_rule.items())), "opened": self.opened,
                "resolved": self.resolved}


def add_totals(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The sum of chunk results (a parent's totals are exactly its children's)."""
    total: dict[str, Any] = {"candidates": 0, "cache_hits": 0, "validated": 0, "issues": {},
                             "by_rule": {}, "opened": 0, "resolved": 0}
    for part in parts:
        for k in ("candidates", "cache_hits", "validated", "opened", "resolved"):
            total[k] += int(part.get(k, 0))
        for k in ("issues", "by_rule"):
            for name, n in (part.get(k) or {}).items():
                total[k][name] = total[k].get(name, 0) + int(n)
    total["by_rule"] = dict(sorted(total["by_rule"].items()))
    return total


# -- sweeps -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sweep:
    id: int
    mode: str
    plan: str
    rules_version: str
    scan_from: datetime
    since: datetime | None
    character_ids: list[int] | None
    status: str
    chunks: int

    def cache_from(self, overlap: float) -> datetime | None:
        """The verdicts worth caching: an incremental sweep's all; a full sweep's only of
        characters written within `overlap` before its start, the only unchanged ones the
        next incremental sweep reads again (caching all 1M verdicts of a full sweep cost it
        a fifth of its time and ~100 MB of Redis for entries nothing would read)."""
        if self.mode == "incremental":
            return None
        return self.scan_from - timedelta(seconds=overlap)


def start_sweep(session: Session, *, job_id: str | None, mode: str,
                character_ids: Sequence[int] | None, rules_version: str, chunk_size: int,
                overlap: float) -> tuple[Sweep, bool]:
    """The sweep of this job: created on the job's first run, found again on a later one
    (a parent's task runs again once its children end). Returns (sweep, created)."""
    if job_id is not None:
        found = _sweep_by_job(session, job_id)
        if found is not None:
            return found, False
    since = None
    if mode == "incremental" and character_ids is None:
        last = session.execute(text(
            "SELECT max(scan_from) FROM validation_sweeps WHERE status = 'succeeded' "
            "AND character_ids IS NULL AND rules_version = :v"), {"v": rules_version},
        ).scalar_one()
        # No successful sweep under these rules yet: every character is a candidate.
        since = last - timedelta(seconds=overlap) if last is not None else None
    count = count_candidates(session, since=since, character_ids=character_ids)
    plan = "inline" if count <= chunk_size else "fanout"
    row = session.execute(text(
        "INSERT INTO validation_sweeps (job_id, mode, character_ids, plan, rules_version, "
        "scan_from, since) VALUES (:j, :m, :ids, :p, :v, now(), :s) RETURNING id, scan_from"),
        {"j": job_id, "m": mode, "ids": list(character_ids) if character_ids else None,
         "p": plan, "v": rules_version, "s": since},
    ).one()
    sweep = Sweep(int(row.id), mode, plan, rules_version, row.scan_from, since,
                  list(character_ids) if character_ids else None, "running", 0)
    return sweep, True


def _sweep_by_job(session: Session, job_id: str) -> Sweep | None:
    r = session.execute(text(
        "SELECT id, mode, plan, rules_version, scan_from, since, character_ids, status, "
        "chunks FROM validation_sweeps WHERE job_id = :j"), {"j": job_id}).first()
    return _sweep(r) if r is not None else None


def sweep_for_chunk(session: Session, sweep_id: int) -> Sweep:
    """The sweep a chunk belongs to (its mode, watermark and character list)."""
    r = session.execute(text(
        "SELECT id, mode, plan, rules_version, scan_from, since, character_ids, status, "
        "chunks FROM validation_sweeps WHERE id = :id"), {"id": sweep_id}).first()
    if r is None:
        raise SweepNotFound(f"no validation sweep {sweep_id}")
    return _sweep(r)


def _sweep(r: Any) -> Sweep:
    return Sweep(int(r.id), r.mode, r.plan, r.rules_version, r.scan_from, r.since,
                 list(r.character_ids) if r.character_ids else None, r.status, int(r.chunks))


def count_candidates(session: Session, *, since: datetime | None,
                     character_ids: Sequence[int] | None) -> int:
    where, args = _where(None, None, since, character_ids)
    return int(session.execute(text(f"SELECT count(*) FROM characters c WHERE {where}"),
                               args).scalar_one())


def sweep_inline(session: Session, sweep: Sweep, rules_version: str,
                 overlap: float) -> tuple[dict[str, Any], ChunkResult]:
    """A sweep small enough for one job: every candidate in one chunk, in the caller's
    transaction; returns the finished sweep and the chunk (whose verdicts the caller caches
    after the commit)."""
    done = validate_chunk(session, sweep_id=sweep.id, rules_version=rules_version,
                          use_cache=sweep.mode == "incremental", since=sweep.since,
                          character_ids=sweep.character_ids,
                          cache_from=sweep.cache_from(overlap))
    return finish_sweep(session, sweep.id, done.as_dict()), done


def plan_chunks(session: Session, sweep: Sweep, chunk_size: int) -> list[dict[str, Any]]:
    """Chunk params by id range: [lo, hi) holding about `chunk_size` candidates each.

    Ranges come from the candidates' ids themselves (every chunk_size-th id), so sparse or
    clustered ids still give even chunks.
    """
    where, args = _where(None, None, sweep.since, sweep.character_ids)
    bounds = [int(r[0]) for r in session.execute(text(
        f"SELECT id FROM (SELECT c.id, row_number() OVER (ORDER BY c.id) - 1 AS n "
        f"FROM characters c WHERE {where}) x WHERE n % :size = 0 ORDER BY id"),
        {**args, "size": chunk_size})]
    chunks = []
    for i, lo in enumerate(bounds):
        hi = bounds[i + 1] if i + 1 < len(bounds) else None
        chunks.append({"sweep_id": sweep.id, "id_from": lo, "id_to": hi})
    session.execute(text("UPDATE validation_sweeps SET chunks = :n WHERE id = :id"),
                    {"n": len(chunks), "id": sweep.id})
    return chunks


def finish_sweep(session: Session, sweep_id: int, totals: dict[str, Any], *,
                 status: str = "succeeded", error: str | None = None) -> dict[str, Any]:
    """Record the sweep's outcome; a succeeded full or incremental sweep becomes the next
    incremental sweep's watermark. Adds the open issues as they stand now."""
    open_now = {r.severity: int(r.n) for r in session.execute(text(
        "SELECT severity, count(*) AS n FROM validation_issues WHERE resolved_at IS NULL "
        "GROUP BY severity"))}
    out = {**totals, "open_issues": open_now}
    session.execute(text(
        "UPDATE validation_sweeps SET status = :st, finished_at = clock_timestamp(), "
        "totals = CAST(:t AS jsonb), error = :e WHERE id = :id"),
        {"st": status, "t": json.dumps(out), "e": error, "id": sweep_id})
    return get_sweep(session, sweep_id)


def get_sweep(session: Session, sweep_id: int) -> dict[str, Any]:
    r = session.execute(text(f"SELECT {_SWEEP_COLUMNS} FROM validation_sweeps WHERE id = :id"),
                        {"id": sweep_id}).first()
    if r is None:
        raise SweepNotFound(f"no validation sweep {sweep_id}")
    return _sweep_dict(r)


def list_sweeps(session: Session, *, limit: int = 50,
                before_id: int | None = None) -> list[dict[str, Any]]:
    rows = session.execute(text(
        f"SELECT {_SWEEP_COLUMNS} FROM validation_sweeps "
        "WHERE (CAST(:b AS bigint) IS NULL OR id < :b) ORDER BY id DESC LIMIT :n"),
        {"b": before_id, "n": limit}).all()
    return [_sweep_dict(r) for r in rows]


def sweep_result(sweep: dict[str, Any], children: list[dict[str, Any]]) -> dict[str, Any]:
    """A sweep job's result (what validation.characters returns; the inline CLI stores the
    same on its job row, with no children: its chunks ran in its own process)."""
    return {"sweep_id": sweep["id"], "mode": sweep["mode"], "plan": sweep["plan"],
            "chunks": sweep["chunks"], "rules_version": sweep["rules_version"],
            "since": sweep["since"].isoformat() if sweep["since"] else None,
            "totals": sweep["totals"], "children": children}


_SWEEP_COLUMNS = ("id, job_id, mode, character_ids, status, plan, rules_version, scan_from, "
                  "since, started_at, finished_at, chunks, totals, error")


def _sweep_dict(r: Any) -> dict[str, Any]:
    out = dict(r._mapping)
    out["job_id"] = str(out["job_id"]) if out["job_id"] is not None else None
    return out


# -- one chunk ---------------------------------------------------------------------------------

def _where(id_from: int | None, id_to: int | None, since: datetime | None,
           character_ids: Sequence[int] | None) -> tuple[str, dict[str, Any]]:
    """The candidate filter, built from the conditions that apply (a literal `:x IS NULL OR`
    would hide the updated_at index from the planner)."""
    where: list[str] = ["true"]
    args: dict[str, Any] = {}
    if id_from is not None:
        where.append("c.id >= :lo")
        args["lo"] = id_from
    if id_to is not None:
        where.append("c.id < :hi")
        args["hi"] = id_to
    if since is not None:
        where.append("c.updated_at >= :since")
        args["since"] = since
    if character_ids is not None:
        where.append("c.id = ANY(:ids)")
        args["ids"] = list(character_ids)
    return " AND ".join(where), args


_CHECKER = checks.CharacterChecker()


def validate_chunk(
    session: Session,
    *,
    sweep_id: int,
    rules_version: str,
    use_cache: bool,
    id_from: int | None = None,
    id_to: int | None = None,
    since: datetime | None = None,
    character_ids: Sequence[int] | None = None,
    cache_from: datetime | None = None,
) -> ChunkResult:
    """Validate the candidates of one chunk and store their issues (in the caller's
    transaction). Cached characters (same row version, same rules) are skipped; the
    verdicts to cache are those of characters written since `cache_from` (all if None)."""
    result = ChunkResult()
    where, args = _where(id_from, id_to, since, character_ids)
    columns = ", ".join(f"c.{col}" for col in checks.CHECK_COLUMNS)
    # The driver's cursor: a full sweep reads every character, and SQLAlchemy's row objects
    # cost more than the checks themselves.
    raw = session.connection().connection.driver_connection
    assert raw is not None
    sql = (f"SELECT c.id, c.xmin::text::bigint, c.updated_at, {columns} FROM characters c "
           f"WHERE {where} ORDER BY c.id")
    with raw.cursor() as cur:
        cur.execute(_psycopg(sql), args)
        rows = cur.fetchall()
    result.candidates = len(rows)
    if use_cache and rows:
        rows = _uncached(rows, rules_version, result)
    result.validated = len(rows)
    if not rows:
        return result
    ids = [r[0] for r in rows]
    # A whole id range reads the ledger by range (one index range scan); a filtered chunk
    # (incremental, named ids) by its ids.
    whole_range = since is None and character_ids is None and result.cache_hits == 0
    ledger, spends = _cross_rows(raw, ids, (id_from, id_to) if whole_range else None)
    issue_rows: list[tuple[int, str, str, str, str]] = []
    check = _CHECKER.check
    xp_at = 3  # rows are (id, version, updated_at, *CHECK_COLUMNS); CHECK_COLUMNS[0] is xp
    for r in rows:
        cid = r[0]
        found = check(r[3:])
        lead = checks.ledger_issue(r[xp_at], ledger.get(cid, 0))
        if lead is not None:
            found.append(lead)
        for req in spends.get(cid, ()):
            found.extend(checks.spend_issues(*req))
        for issue in found:
            issue_rows.append((cid, issue.rule, issue.subject, issue.severity, issue.message))
            result.issues[issue.severity] += 1
            result.by_rule[issue.rule] += 1
    result.opened, result.resolved = _store(session, sweep_id, ids, issue_rows)
    result.verdicts = [(r[0], r[1]) for r in rows if cache_from is None or r[2] >= cache_from]
    return result


def _psycopg(sql: str) -> str:
    """SQLAlchemy-style :name placeholders as psycopg's %(name)s (for the raw cursor)."""
    import re

    return re.sub(r"(?<!:):([a-z_]+)", r"%(\1)s", sql)


def _uncached(rows: list[Any], rules_version: str, result: ChunkResult) -> list[Any]:
    """The rows whose cached verdict is missing or for another row version. A Redis error
    just means no cache: every row is validated."""
    try:
        cached = get_redis().mget([cache_key(rules_version, r[0]) for r in rows])
    except redis.RedisError as exc:
        log.warning("validation.cache_unavailable", error=str(exc))
        return rows
    fresh = [r for r, c in zip(rows, cached, strict=True) if c is None or int(c) != r[1]]
    result.cache_hits = len(rows) - len(fresh)
    return fresh


def _cross_rows(raw: Any, ids: list[int], id_range: tuple[int | None, int | None] | None
                ) -> tuple[dict[int, int], dict[int, list[Any]]]:
    """The ledger sums and the pending spend requests of these characters."""
    if id_range is not None:
        lo, hi = id_range
        where = "character_id >= %(lo)s" + (" AND character_id < %(hi)s" if hi else "")
        args: dict[str, Any] = {"lo": lo or 0, "hi": hi}
    else:
        where, args = "character_id = ANY(%(ids)s)", {"ids": ids}
    pending = rules.SPEND_PENDING
    with raw.cursor() as cur:
        cur.execute("SELECT character_id, sum(delta)::bigint FROM xp_ledger "
                    f"WHERE {where} GROUP BY character_id", args)
        ledger = {int(c): int(s) for c, s in cur.fetchall()}
        cur.execute("SELECT character_id, id, trait_name, trait_value, cost "
                    f"FROM xp_spend_requests WHERE state = %(pending)s AND {where}",
                    {**args, "pending": pending})
        spends: dict[int, list[Any]] = {}
        for cid, rid, name, value, cost in cur.fetchall():
            spends.setdefault(cid, []).append((rid, name, value, cost))
    return ledger, spends


def _store(session: Session, sweep_id: int, ids: list[int],
           issue_rows: list[tuple[int, str, str, str, str]]) -> tuple[int, int]:
    """Upsert the issues seen (new ones open, known ones get last_seen), then resolve the
    open issues of these characters that were not seen. Returns (opened, resolved)."""
    opened = 0
    if issue_rows:
        cols = list(zip(*issue_rows, strict=True))
        opened = int(session.execute(text("""
            WITH up AS (
                INSERT INTO validation_issues AS v (character_id, rule, subject, severity,
                    message, first_seen, last_seen, first_sweep_id, last_sweep_id)
                SELECT c, r, s, sv, m, now(), now(), :sweep, :sweep
                FROM unnest(CAST(:c AS bigint[]), CAST(:r AS text[]), CAST(:s AS text[]),
                            CAST(:sv AS text[]), CAST(:m AS text[])) AS n(c, r, s, sv, m)
                ORDER BY c, r, s
                ON CONFLICT (character_id, rule, subject) WHERE resolved_at IS NULL
                DO UPDATE SET last_seen = now(), last_sweep_id = :sweep,
                              message = EXCLUDED.message, severity = EXCLUDED.severity
                RETURNING (v.xmax = 0) AS inserted
            )
            SELECT count(*) FILTER (WHERE inserted) FROM up
        """), {"c": list(cols[0]), "r": list(cols[1]), "s": list(cols[2]),
               "sv": list(cols[3]), "m": list(cols[4]), "sweep": sweep_id}).scalar_one())
    # Every issue seen above now has last_seen = now() (this transaction's time); an open
    # issue of these characters with an older last_seen was not seen: it is fixed.
    # Locked in the upsert's order (character, rule, subject), so two sweeps over the same
    # characters queue behind each other instead of deadlocking.
    resolved = session.execute(text(
        "UPDATE validation_issues SET resolved_at = now(), resolved_sweep_id = :sweep "
        "WHERE id IN (SELECT id FROM validation_issues WHERE resolved_at IS NULL "
        "AND character_id = ANY(:ids) AND last_seen < now() "
        "ORDER BY character_id, rule, subject FOR UPDATE)"),
        {"ids": ids, "sweep": sweep_id})
    return opened, int(resolved.rowcount)  # type: ignore[attr-defined]


# One SET with a TTL per key, in one round trip per batch. Why a script: redis-py spends
# ~60 us of Python per pipelined command, which made caching cost twice the validation
# itself (3 s per 25,000 characters); one command with 10,000 arguments packs in ~20 ms.
_SET_ALL = """
local ttl = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do redis.call('SET', k, ARGV[i + 1], 'EX', ttl) end
return #KEYS
"""
_BATCH = 5000  # keys per script call: Redis runs one call for ~3 ms, never much longer


def remember(verdicts: list[tuple[int, int]], rules_version: str, ttl: int) -> None:
    """Cache the verdicts of a committed chunk (best effort: a failure costs a re-check)."""
    if not verdicts:
        return
    try:
        script = get_redis().register_script(_SET_ALL)
        for start in range(0, len(verdicts), _BATCH):
            batch = verdicts[start:start + _BATCH]
            script(keys=[cache_key(rules_version, cid) for cid, _ in batch],
                   args=[ttl, *(version for _, version in batch)])
    except redis.RedisError as exc:
        log.warning("validation.cache_not_written", error=str(exc), count=len(verdicts))


# -- reads ----------------------------------------------------------------------------------------

def issues(session: Session, *, character_id: int | None = None, state: str = "open",
           severity: str | None = None, rule: str | None = None, limit: int = 100,
           before_id: int | None = None) -> list[dict[str, Any]]:
    """Issues newest first; state open, resolved or all."""
    where: list[str] = ["true"]
    args: dict[str, Any] = {"n": limit}
    if character_id is not None:
        where.append("character_id = :c")
        args["c"] = character_id
    if state == "open":
        where.append("resolved_at IS NULL")
    elif state == "resolved":
        where.append("resolved_at IS NOT NULL")
    if severity:
        where.append("severity = :sv")
        args["sv"] = severity
    if rule:
        where.append("rule = :r")
        args["r"] = rule
    if before_id is not None:
        where.append("id < :b")
        args["b"] = before_id
    rows = session.execute(text(
        "SELECT id, character_id, rule, subject, severity, message, first_seen, last_seen, "
        f"resolved_at FROM validation_issues WHERE {' AND '.join(where)} "
        "ORDER BY id DESC LIMIT :n"), args).all()
    return [dict(r._mapping) for r in rows]
