"""The integrity audit (DOMAIN.md checks 1-8): set-based scans, a fix in one transaction,
and its undo. Plain functions taking a session; no Celery.

How a run goes, all inside the caller's transaction:
1. One pass per table computes every selected check of that table: characters (checks 1-6,
   every predicate of domain.checks OR-ed in one WHERE; the rows that break any are copied
   to a temp table), scenes (check 8) and st_relationships (check 7, one window pass).
2. With fix=true: the rows found are locked in ascending id order (characters first, then
   ST relationships), re-checked as they are NOW (a concurrent writer may have changed them
   since the scan), and fixed from their current values in one UPDATE per table; each
   changed row's before and after values go to audit_changes.
3. The findings are stored from the scan, each with what the fix did to it (outcome), and
   the run gets its totals per check.
The caller commits once, so a fix that fails half-way leaves no trace in the data.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from domain import checks, rules
from workers import jobstore, oplog
from workers.enqueue import Prepared, submit_in
from workers.errors import JobError

Progress = Callable[[int, int, str], None]


class AuditRunNotFound(JobError):
    code = "audit_run_not_found"


class NotAFixRun(JobError):
    code = "not_a_fix_run"


class AlreadyUndone(JobError):
    code = "already_undone"


class UnknownCheck(JobError):
    code = "unknown_check"


class ReasonRequired(JobError):
    """A fix is an operator action (review 2026-12-07, D3): it says why."""

    code = "reason_required"


def _lit(value: str) -> str:
    """A SQL string literal of a constant built in this module or domain.checks."""
    return "'" + value.replace("'", "''") + "'"


def _analyze(session: Session, table: str) -> None:
    """Autovacuum never analyzes temp tables; the joins that follow need their row counts."""
    session.execute(text(f"ANALYZE {table}"))


def selected_checks(names: Sequence[str] | None) -> tuple[str, ...]:
    """The checks to run, in DOMAIN.md order (all when `names` is empty)."""
    if not names:
        return rules.INTEGRITY_CHECKS
    unknown = sorted(set(names) - set(rules.INTEGRITY_CHECKS))
    if unknown:
        raise UnknownCheck(f"unknown check(s) {', '.join(unknown)}; known: "
                           f"{', '.join(rules.INTEGRITY_CHECKS)}")
    return tuple(c for c in rules.INTEGRITY_CHECKS if c in names)


# -- the run --------------------------------------------------------------------------------

def run_audit(
    session: Session,
    *,
    fix: bool = False,
    check_names: Sequence[str] | None = None,
    job_id: str | None = None,
    lock_timeout: float | None = None,
    progress: Progress | None = None,
    actor: str | None = None,
    reason: str | None = None,
    submitted: list[Prepared] | None = None,
) -> dict[str, Any]:
    """Run the audit (and the fix), store the run and its findings; returns the stored run.

    `lock_timeout` (seconds) bounds each wait for a row lock in fix mode: a lock that does
    not come fails the run (transient: the job retries), rather than stalling writers
    queued behind the audit.

    A fix is an operator action: it needs `reason`, and the operator log records it with
    `actor` (default: the job) in this transaction. Its scene_xp fix queues the missing
    award of each finished scene awaiting XP in this transaction too (workers.enqueue.
    submit_in); they are appended to `submitted` for the caller to publish once committed
    (unpublished, the relay sends them).
    """
    if fix and not (reason and reason.strip()):
        raise ReasonRequired("a fix is an operator action: give the reason (--reason), "
                             "recorded in the operator log")
    selected = selected_checks(check_names)
    character_rules = checks.rules_of(selected)
    steps = ((2 if fix else 1) if character_rules else 0) + (checks.ST_CHECK in selected) + 2
    step = _Steps(progress, steps)
    # JIT off: on the 1M-character scan it was no faster (measured: equal or slower), and
    # each parallel worker pays its compile time (~0.3 s with optimization) again.
    session.execute(text("SET LOCAL jit = off"))
    if fix and lock_timeout is not None:
        session.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'"))
    run_id = int(session.execute(
        text("INSERT INTO audit_runs (job_id, mode, checks, rules_version, started_at, totals) "
             "VALUES (:j, :m, :c, :v, clock_timestamp(), '{}') RETURNING id"),
        {"j": job_id, "m": "fix" if fix else "check", "c": list(selected),
         "v": rules.rules_version()},
    ).scalar_one())
    if character_rules:
        _scan_characters(session, character_rules)
        step("characters scanned")
        if fix:
            _fix_characters(session, run_id, character_rules, job_id)
            step("characters fixed")
        _store_character_findings(session, run_id, character_rules, fix)
    if checks.ST_CHECK in selected:
        _scan_st(session)
        if fix:
            _fix_st(session, run_id)
        _store_st_findings(session, run_id, fix)
        step("st_relationships done")
    if checks.SCENE_CHECK in selected:
        if fix:
            queued = _submit_awards(session, run_id)
            if submitted is not None:
                submitted.extend(queued)
        _store_scene_findings(session, run_id, fix)
    step("scenes done")
    _finish(session, run_id, selected, fix)
    step("stored")
    run = get_run(session, run_id)
    if fix:
        assert reason is not None
        who = actor or (f"job:{job_id}" if job_id else "unknown")  # beat or a bare call
        oplog.record(session, actor=who, action="audit.fix",
                     target=f"audit_run:{run_id}", reason=reason, count=int(run["changed_rows"]),
                     details={"job_id": job_id, "checks": list(selected),
                              "fixed": run["fixed"], "remaining": run["remaining"],
                              "awards_submitted": _count_outcome(run, "award_submitted")})
    return run


def _count_outcome(run: dict[str, Any], outcome: str) -> int:
    return sum(int(t.get(outcome, 0)) for t in run["totals"].values())


@dataclass
class _Steps:
    report: Progress | None
    total: int
    done: int = 0

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.report is not None:
            self.report(self.done, self.total, what)


def violation_index_ready(session: Session, index: checks.ViolationIndex) -> bool:
    """Whether the table's violation index exists, is valid and was built for the current
    rules (its comment carries their predicate's tag). Otherwise the scan reads the table."""
    tag = session.execute(
        text("SELECT obj_description(i.indexrelid, 'pg_class') FROM pg_index i "
             "JOIN pg_class c ON c.oid = i.indexrelid "
             "WHERE c.relname = :name AND c.relnamespace = current_schema()::regnamespace "
             "AND i.indisvalid AND i.indisready"),
        {"name": index.name}).scalar()
    return bool(tag == index.tag)


@contextmanager
def _from_violation_index(session: Session, table: str) -> Iterator[bool]:
    """Within the block, the planner reads `table`'s offenders from its violation index
    when it is ready (a serial index scan of a few thousand entries; the row estimates of
    ~35 OR-ed predicates would otherwise lead it to a full scan). Yields whether it does."""
    ready = violation_index_ready(session, checks.VIOLATION_INDEXES[table])
    if not ready:
        yield False
        return
    saved = session.execute(text(
        "SELECT current_setting('enable_seqscan'), "
        "current_setting('max_parallel_workers_per_gather')")).one()
    session.execute(text("SELECT set_config('enable_seqscan', 'off', true), "
                         "set_config('max_parallel_workers_per_gather', '0', true)"))
    try:
        yield True
    finally:
        session.execute(text("SELECT set_config('enable_seqscan', :a, true), "
                             "set_config('max_parallel_workers_per_gather', :b, true)"),
                        {"a": saved[0], "b": saved[1]})


def _scan_characters(session: Session, selected: Sequence[checks.CharacterRule]) -> None:
    """Every row breaking any selected rule, with the positions (in `selected`) of the rules
    it breaks, into a temp table: from the violation index when it is ready (PostgreSQL
    evaluated every rule when each row was written), else one pass over the table."""
    columns = ", ".join(checks.CHECK_COLUMNS)
    broken = ", ".join(f"CASE WHEN {r.sql} THEN {i} END" for i, r in enumerate(selected))
    session.execute(text("DROP TABLE IF EXISTS audit_scan"))
    with _from_violation_index(session, "characters"):
        session.execute(text(
            f"CREATE TEMP TABLE audit_scan ON COMMIT DROP AS SELECT id, {columns}, "
            f"array_remove(ARRAY[{broken}], NULL) AS broken "
            f"FROM characters WHERE {checks.any_broken_sql(selected)}"
        ))


def _fix_characters(session: Session, run_id: int,
                    selected: Sequence[checks.CharacterRule], job_id: str | None) -> None:
    """Lock the rows found, in id order; re-check them as they are now; fix them from their
    current values in one UPDATE; record each changed row's before and after.

    A changed xp writes its xp_ledger row (kind adjust) in the same statement: xp equals the
    sum of its ledger after a fix as before it (review 2026-12-07, N16).

    A row that also breaks a rule of a check NOT selected is left alone (blocked): its
    NOT VALID constraint would refuse the UPDATE, and fixing the other rule too would do
    more than was asked.
    """
    _analyze(session, "audit_scan")  # the joins below need its row count
    columns = ", ".join(checks.CHECK_COLUMNS)
    others = [r for r in checks.CHARACTER_RULES if r not in selected]
    fixed = checks.fixed_columns(selected)
    session.execute(text("DROP TABLE IF EXISTS audit_locked"))
    # FOR UPDATE under ORDER BY locks in id order; under READ COMMITTED a row changed by a
    # writer we waited for comes back in its new version (that is the re-check's input).
    session.execute(text(
        f"CREATE TEMP TABLE audit_locked ON COMMIT DROP AS SELECT id, {columns} "
        "FROM characters WHERE id IN (SELECT id FROM audit_scan) ORDER BY id FOR UPDATE"
    ))
    _analyze(session, "audit_locked")
    violated = ", ".join(f"CASE WHEN {r.sql} THEN {_lit(r.key)} END" for r in selected)
    news = ", ".join(f"{checks.fix_sql(c)} AS new_{c}" for c in fixed)
    session.execute(text("DROP TABLE IF EXISTS audit_plan"))
    session.execute(text(
        f"CREATE TEMP TABLE audit_plan ON COMMIT DROP AS SELECT l.*, "
        f"array_remove(ARRAY[{violated}], NULL) AS violated, "
        f"{checks.any_broken_sql(others)} AS blocked, {news} FROM audit_locked l"
    ))
    _analyze(session, "audit_plan")
    sets = ", ".join(f"{c} = p.new_{c}" for c in fixed)
    pairs = ", ".join(f"({_lit(c)}, to_jsonb(p.{c}), to_jsonb(p.new_{c}))" for c in fixed)
    forced = ("p.status IS DISTINCT FROM p.new_status" if "status" in fixed else "false")
    note = ("CASE WHEN p.status IS DISTINCT FROM p.new_status THEN 'forced status change: ' || "
            f"quote_literal(p.status) || ' is not a known code, so no transition leads to ' || "
            f"{_lit(repr(rules.DEFAULT_STATUS))} END" if "status" in fixed else "NULL")
    ledger = ""
    if "xp" in fixed:
        ledger = """, ledger AS (
            INSERT INTO xp_ledger (character_id, delta, kind, reason, job_id)
            SELECT p.id, p.new_xp - p.xp, 'adjust', :why, CAST(:job AS uuid)
            FROM upd u JOIN audit_plan p ON p.id = u.id
            WHERE p.new_xp IS DISTINCT FROM p.xp
            ORDER BY p.id
        )"""
    session.execute(text(f"""
        WITH upd AS (
            UPDATE characters c SET {sets}
            FROM audit_plan p
            WHERE c.id = p.id AND NOT p.blocked AND cardinality(p.violated) > 0
            RETURNING c.id, c.updated_at
        ){ledger}
        INSERT INTO audit_changes (run_id, entity, entity_id, action, before, after,
                                   forced_status, row_updated_at, note)
        SELECT :run, 'character', p.id, 'update', d.before, d.after, {forced},
               u.updated_at, {note}
        FROM upd u
        JOIN audit_plan p ON p.id = u.id
        CROSS JOIN LATERAL (
            SELECT jsonb_object_agg(k, b) AS before, jsonb_object_agg(k, a) AS after
            FROM (VALUES {pairs}) v(k, b, a) WHERE b IS DISTINCT FROM a
        ) d
        ORDER BY p.id
    """), {"run": run_id, "job": job_id, "why": f"audit fix (run {run_id}): {_XP_RULES}"})


# What an xp ledger row of a fix or its undo names as its cause.
_XP_RULES = ", ".join(r.key for r in checks.CHARACTER_RULES if r.field == "xp")


def _store_character_findings(session: Session, run_id: int,
                              selected: Sequence[checks.CharacterRule], fix: bool) -> None:
    """One finding per (row, broken rule) of the scan; in fix mode with the fix's outcome.

    The rules' facts come from a constant table joined on the rule's position; a finding's
    value and fix are a CASE on that position, so each finding evaluates only its own rule's
    expressions (a LATERAL subquery per rule cost 16 s for 450K findings; this, ~1 s).
    """
    meta = ", ".join(
        f"({i}, {_lit(r.check)}, {_lit(r.key)}, {_lit(r.field)}, {_lit(r.expected)})"
        for i, r in enumerate(selected))
    value = " ".join(f"WHEN {i} THEN to_jsonb({r.field})" for i, r in enumerate(selected))
    fixed = " ".join(f"WHEN {i} THEN to_jsonb({checks.fix_sql(r.field)})"
                     for i, r in enumerate(selected))
    outcome = "NULL"
    join = ""
    if fix:
        # Renamed, so the rules' bare column names resolve to the scanned row only.
        join = ("LEFT JOIN (SELECT id AS plan_id, violated, blocked FROM audit_plan) p "
                "ON p.plan_id = t.id")
        outcome = ("CASE WHEN p.plan_id IS NULL THEN 'gone' "
                   "WHEN NOT (m.rule = ANY(p.violated)) THEN 'resolved_meanwhile' "
                   "WHEN p.blocked THEN 'blocked' ELSE 'fixed' END")
    session.execute(text(f"""
        INSERT INTO audit_findings (run_id, check_name, rule, level, entity, entity_id, field,
                                    value, expected, fix, fixable, outcome)
        SELECT :run, m.check_name, m.rule, 'finding', 'character', t.id, m.field,
               CASE k.pos {value} END, m.expected, CASE k.pos {fixed} END, true, {outcome}
        FROM audit_scan t
        CROSS JOIN LATERAL unnest(t.broken) AS k(pos)
        JOIN (VALUES {meta}) m(pos, check_name, rule, field, expected) ON m.pos = k.pos
        {join}
    """), {"run": run_id})


def _scan_st(session: Session) -> None:
    """One window pass over st_relationships: every row of a duplicated triple but the
    lowest id."""
    key = checks.ST_KEY_SQL
    session.execute(text("DROP TABLE IF EXISTS audit_st_scan"))
    session.execute(text(
        f"CREATE TEMP TABLE audit_st_scan ON COMMIT DROP AS SELECT id, {key}, keep FROM ("
        f"SELECT id, {key}, min(id) OVER (PARTITION BY {key}) AS keep "
        "FROM st_relationships) s WHERE id <> keep"
    ))


def _fix_st(session: Session, run_id: int) -> None:
    """Lock every row of the duplicated triples (keepers too) in id order, find the
    duplicates again among the rows as they are now, delete them, record each row."""
    key = checks.ST_KEY_SQL
    _analyze(session, "audit_st_scan")  # the IN below needs its row count
    session.execute(text("DROP TABLE IF EXISTS audit_st_locked"))
    session.execute(text(
        f"CREATE TEMP TABLE audit_st_locked ON COMMIT DROP AS SELECT s.* FROM st_relationships s "
        f"WHERE ({key}) IN (SELECT {key} FROM audit_st_scan) ORDER BY s.id FOR UPDATE"
    ))
    _analyze(session, "audit_st_locked")
    session.execute(text(f"""
        WITH dup AS (
            SELECT id FROM (
                SELECT id, min(id) OVER (PARTITION BY {key}) AS keep FROM audit_st_locked
            ) x WHERE id <> keep
        ), del AS (
            DELETE FROM st_relationships s USING dup WHERE s.id = dup.id RETURNING s.*
        )
        INSERT INTO audit_changes (run_id, entity, entity_id, action, before, after)
        SELECT :run, 'st_relationship', d.id, 'delete', to_jsonb(d), NULL FROM del d
        ORDER BY d.id
    """), {"run": run_id})


def _store_st_findings(session: Session, run_id: int, fix: bool) -> None:
    key_json = ", ".join(f"{_lit(c)}, t.{c}" for c in rules.ST_RELATIONSHIP_KEY)
    outcome, join = "NULL", ""
    if fix:
        join = ("LEFT JOIN audit_st_locked l ON l.id = t.id "
                "LEFT JOIN audit_changes c ON c.run_id = :run AND c.entity = 'st_relationship' "
                "AND c.entity_id = t.id")
        outcome = ("CASE WHEN c.id IS NOT NULL THEN 'fixed' WHEN l.id IS NULL THEN 'gone' "
                   "ELSE 'resolved_meanwhile' END")
    session.execute(text(f"""
        INSERT INTO audit_findings (run_id, check_name, rule, level, entity, entity_id, field,
                                    value, expected, fix, fixable, outcome)
        SELECT :run, :check, :rule, 'finding', 'st_relationship', t.id, :field,
               jsonb_build_object({key_json}),
               :expected || t.keep || ', is kept',
               NULL, true, {outcome}
        FROM audit_st_scan t {join}
        ORDER BY t.id
    """), {"run": run_id, "check": checks.ST_CHECK, "rule": checks.ST_RULE,
           "field": checks.ST_KEY_SQL,
           "expected": f"one row per ({checks.ST_KEY_SQL}); the lowest id, "})


# The scene award a fix queues for a finished scene awaiting XP: what a storyteller would
# submit (every participant earned it), under a key of the run, through the normal path.
AWARD_TYPE = "xp.award_scene"


def award_key(run_id: int, scene_id: int) -> str:
    """The idempotency key of the award fix run `run_id` queues for `scene_id`."""
    return f"audit-fix-{run_id}-scene-{scene_id}"


def _submit_awards(session: Session, run_id: int) -> list[Prepared]:
    """Queue the missing award of each finished scene awaiting XP (check 8's report), in
    this transaction. A scene whose award job is queued or running gets none (it is on its
    way: award_pending). A scene whose storyteller's award failed or died (a participant
    broke a rule, since fixed) gets that job retried with its own awards: the storyteller
    chose who earned XP, and the fix must not widen it. Only a scene no award was ever
    submitted for gets one naming every participant. Each scene's outcome goes to the temp
    table audit_scene_awards."""
    latest = {str(scene): (str(job), status) for scene, job, status in session.execute(text(
        "SELECT DISTINCT ON (params ->> 'scene_id') params ->> 'scene_id', id, status "
        "FROM job_runs WHERE type = :type "
        "ORDER BY params ->> 'scene_id', (status IN ('queued', 'retrying', 'running')) DESC, "
        "created_at DESC"), {"type": AWARD_TYPE}).all()}
    with _from_violation_index(session, "scenes"):
        rows = session.execute(text(
            "SELECT s.id, ARRAY(SELECT p.character_id FROM scene_participants p "
            "WHERE p.scene_id = s.id ORDER BY 1) AS participants "
            f"FROM scenes s WHERE {checks.scenes_broken_sql()} "
            f"AND ({rules.SCENE_AWAITING_XP}) ORDER BY s.id")).all()
    queued: list[Prepared] = []
    outcomes: list[dict[str, Any]] = []
    for r in rows:
        job, status = latest.get(str(r.id), (None, None))
        if status in ("queued", "retrying", "running"):
            outcomes.append({"s": int(r.id), "j": job, "o": "award_pending"})
            continue
        if status in ("failed", "dead") and session.execute(text(
                f"UPDATE job_runs SET {jobstore.RETRY_SET} WHERE id = CAST(:id AS uuid) "
                "AND status IN ('failed', 'dead') RETURNING 1"), {"id": job}).first():
            # the relay sends it (published_at is reset): sent after this commits
            outcomes.append({"s": int(r.id), "j": job, "o": "award_submitted"})
            continue
        prepared = submit_in(session, AWARD_TYPE,
                             {"scene_id": int(r.id),
                              "awards": {int(c): True for c in r.participants}},
                             idempotency_key=award_key(run_id, int(r.id)), source="audit.fix")
        queued.append(prepared)
        outcomes.append({"s": int(r.id), "j": str(prepared.row_params["id"]),
                         "o": "award_submitted"})
    session.execute(text("DROP TABLE IF EXISTS audit_scene_awards"))
    session.execute(text("CREATE TEMP TABLE audit_scene_awards (scene_id bigint PRIMARY KEY, "
                         "job_id uuid, outcome varchar) ON COMMIT DROP"))
    if outcomes:
        session.execute(text("INSERT INTO audit_scene_awards VALUES (:s, CAST(:j AS uuid), :o)"),
                        outcomes)
    return queued


def _store_scene_findings(session: Session, run_id: int, fix: bool) -> None:
    """One pass over scenes for every rule of check 8. In fix mode a scene awaiting XP
    names the award job queued for it (outcome award_submitted, or award_pending); an
    xp_given flag on an unfinished scene has no automatic fix (unfixable)."""
    values = ", ".join(
        f"({r.sql}, {_lit(r.key)}, {_lit(r.level)}, {_lit(r.expected)})"
        for r in checks.SCENE_RULES
    )
    outcome, fixed, join = "NULL", "NULL", ""
    if fix:
        outcome = "CASE WHEN f.level = 'finding' THEN 'unfixable' ELSE a.outcome END"
        fixed = ("CASE WHEN a.job_id IS NOT NULL THEN jsonb_build_object("
                 "'xp_given', true, 'award_job', a.job_id) END")
        join = "LEFT JOIN audit_scene_awards a ON a.scene_id = s.id AND f.level = 'report'"
    with _from_violation_index(session, "scenes"):
        _insert_scene_findings(session, run_id, values, outcome, fixed, join)


def _insert_scene_findings(session: Session, run_id: int, values: str, outcome: str,
                           fixed: str, join: str) -> None:
    session.execute(text(f"""
        INSERT INTO audit_findings (run_id, check_name, rule, level, entity, entity_id, field,
                                    value, expected, fix, fixable, outcome)
        SELECT :run, :check, f.rule, f.level, 'scene', s.id, 'xp_given',
               jsonb_build_object('finished', s.finished, 'xp_given', s.xp_given),
               f.expected, {fixed}, f.level = 'report', {outcome}
        FROM (SELECT id, finished, xp_given FROM scenes WHERE {checks.scenes_broken_sql()}) s
        CROSS JOIN LATERAL (VALUES {values}) f(bad, rule, level, expected)
        {join}
        WHERE f.bad
        ORDER BY s.id
    """), {"run": run_id, "check": checks.SCENE_CHECK})


def _finish(session: Session, run_id: int, selected: Sequence[str], fix: bool) -> None:
    """Totals per check from the stored findings; the run's summary columns."""
    rows = session.execute(text(
        "SELECT check_name, level, coalesce(outcome, '') AS outcome, count(*) AS n "
        "FROM audit_findings WHERE run_id = :run GROUP BY 1, 2, 3"
    ), {"run": run_id}).all()
    totals: dict[str, dict[str, int]] = {
        c: {"findings": 0, "reports": 0, **({k: 0 for k in _FIX_OUTCOMES} if fix else {})}
        for c in selected
    }
    for r in rows:
        entry = totals[r.check_name]
        entry["findings" if r.level == "finding" else "reports"] += int(r.n)
        if fix and r.outcome:  # a report's outcome too: the awards a scene_xp fix queued
            entry[r.outcome] = entry.get(r.outcome, 0) + int(r.n)
    changed = int(session.execute(
        text("SELECT count(*) FROM audit_changes WHERE run_id = :run"), {"run": run_id}
    ).scalar_one())
    forced = int(session.execute(
        text("SELECT count(*) FROM audit_changes WHERE run_id = :run AND forced_status"),
        {"run": run_id},
    ).scalar_one())
    findings = sum(t["findings"] for t in totals.values())
    settled = sum(t.get(k, 0) for t in totals.values() for k in _SETTLED)
    session.execute(text(
        "UPDATE audit_runs SET finished_at = clock_timestamp(), totals = CAST(:t AS jsonb), "
        "findings = :f, reports = :r, fixed = :x, remaining = :rem, changed_rows = :ch "
        "WHERE id = :run"
    ), {"run": run_id, "t": json.dumps({**totals, "_forced_status_changes": forced}),
        "f": findings, "r": sum(t["reports"] for t in totals.values()),
        "x": sum(t.get("fixed", 0) for t in totals.values()), "rem": findings - settled,
        "ch": changed})


# Finding outcomes of a fix run; the settled ones leave nothing to fix.
_FIX_OUTCOMES = ("fixed", "resolved_meanwhile", "blocked", "gone", "unfixable")
_SETTLED = ("fixed", "resolved_meanwhile", "gone")


# -- the undo -------------------------------------------------------------------------------

def undo_fix(session: Session, run_id: int, *, actor: str, reason: str,
             lock_timeout: float = 10.0) -> dict[str, Any]:
    """Revert a fix run from its recorded before-values, in the caller's transaction.

    A row is reverted only if nothing changed it since the fix (characters: its updated_at
    is still the one the fix left; a deleted ST relationship: its id is still free); the
    others are listed and left as they are. The restored values break the rule constraints
    (that is why they were fixed), so the constraints they break are dropped and added back
    NOT VALID in this transaction, under an ACCESS EXCLUSIVE lock on characters: brief (the
    rows are known by id), but it blocks every reader of the table until the commit.
    """
    session.execute(text(f"SET LOCAL lock_timeout = '{int(lock_timeout * 1000)}ms'"))
    run = session.execute(
        text("SELECT id, mode, undone_at FROM audit_runs WHERE id = :id FOR UPDATE"),
        {"id": run_id},
    ).first()
    if run is None:
        raise AuditRunNotFound(f"no audit run {run_id}")
    if run.mode != "fix":
        raise NotAFixRun(f"audit run {run_id} was a check run; only fix runs can be undone")
    if run.undone_at is not None:
        raise AlreadyUndone(f"audit run {run_id} was already undone at {run.undone_at}")
    characters = _undo_characters(session, run_id)
    st = _undo_st(session, run_id)
    changed_since = session.execute(text(
        "SELECT entity, entity_id FROM audit_changes WHERE run_id = :run "
        "AND undo_outcome = 'changed_since' ORDER BY entity, entity_id"), {"run": run_id},
    ).all()
    outcome = {
        "run_id": run_id,
        "reverted": characters["reverted"] + st,
        "changed_since": [{"entity": r.entity, "id": int(r.entity_id)} for r in changed_since],
        "constraints_relaxed": characters["constraints"],
        "constraints_were_validated": characters["were_validated"],
    }
    session.execute(text(
        "UPDATE audit_runs SET undone_at = now(), undone_by = :a, undo = CAST(:u AS jsonb) "
        "WHERE id = :id"), {"id": run_id, "a": actor[:100], "u": json.dumps(outcome)})
    oplog.record(session, actor=actor, action="audit.undo", target=f"audit_run:{run_id}",
                 reason=reason, count=int(outcome["reverted"]),
                 details={"changed_since": outcome["changed_since"],
                          "constraints_relaxed": characters["constraints"]})
    return outcome


def _undo_characters(session: Session, run_id: int) -> dict[str, Any]:
    count = int(session.execute(text(
        "SELECT count(*) FROM audit_changes WHERE run_id = :run AND entity = 'character'"),
        {"run": run_id}).scalar_one())
    if count == 0:
        return {"reverted": 0, "constraints": [], "were_validated": []}
    session.execute(text("LOCK TABLE characters IN ACCESS EXCLUSIVE MODE"))
    keys = [str(r[0]) for r in session.execute(text(
        "SELECT DISTINCT rule FROM audit_findings WHERE run_id = :run AND entity = 'character' "
        "AND outcome = 'fixed' ORDER BY 1"), {"run": run_id})]
    saved = session.execute(
        text("SELECT conname, pg_get_constraintdef(oid) AS definition, convalidated "
             "FROM pg_constraint WHERE conrelid = 'characters'::regclass AND conname = ANY(:names) "
             "ORDER BY conname"),
        {"names": [f"ck_characters_{k}" for k in keys]},
    ).all()
    if saved:
        drops = ", ".join(f'DROP CONSTRAINT "{r.conname}"' for r in saved)
        session.execute(text(f"ALTER TABLE characters {drops}"))
    restore = ", ".join(
        f"{c} = CASE WHEN ch.before ? {_lit(c)} THEN "
        f"CAST(ch.before ->> {_lit(c)} AS {_SQL_TYPES.get(c, 'smallint')}) ELSE c.{c} END"
        for c in checks.CHECK_COLUMNS
    )
    # A reverted xp writes its compensating ledger row (N16): xp still equals its ledger sum.
    # The row is unchanged since the fix (its updated_at), so its xp is the fix's after-value.
    session.execute(text(f"""
        WITH rev AS (
            UPDATE characters c SET {restore}
            FROM audit_changes ch
            WHERE ch.run_id = :run AND ch.entity = 'character' AND ch.entity_id = c.id
              AND c.updated_at = ch.row_updated_at
            RETURNING ch.id, ch.entity_id, ch.before, ch.after
        ), ledger AS (
            INSERT INTO xp_ledger (character_id, delta, kind, reason)
            SELECT entity_id, CAST(before ->> 'xp' AS integer) - CAST(after ->> 'xp' AS integer),
                   'adjust', :why
            FROM rev WHERE before ? 'xp' AND after ? 'xp'
              AND before -> 'xp' IS DISTINCT FROM after -> 'xp'
            ORDER BY entity_id
        )
        UPDATE audit_changes a SET undo_outcome = 'reverted' FROM rev WHERE a.id = rev.id
    """), {"run": run_id, "why": f"undo of audit fix (run {run_id}): {_XP_RULES}"})
    if saved:
        adds = ", ".join(
            f'ADD CONSTRAINT "{r.conname}" {r.definition.removesuffix(" NOT VALID")} NOT VALID'
            for r in saved
        )
        session.execute(text(f"ALTER TABLE characters {adds}"))
    session.execute(text(
        "UPDATE audit_changes SET undo_outcome = 'changed_since' WHERE run_id = :run "
        "AND entity = 'character' AND undo_outcome IS NULL"), {"run": run_id})
    done = int(session.execute(text(
        "SELECT count(*) FROM audit_changes WHERE run_id = :run AND entity = 'character' "
        "AND undo_outcome = 'reverted'"), {"run": run_id}).scalar_one())
    return {"reverted": done, "constraints": [r.conname for r in saved],
            "were_validated": [r.conname for r in saved if r.convalidated]}


# Column types for restoring a before-value from JSON (every other checked column is a
# smallint trait: domain/models.py).
_SQL_TYPES = {"xp": "integer", "status": "varchar"}


def _undo_st(session: Session, run_id: int) -> int:
    """Put deleted ST relationships back under their old ids (unless an id was reused)."""
    columns = ", ".join(("id", *rules.ST_RELATIONSHIP_KEY))
    casts = ", ".join(
        f"CAST(ch.before ->> {_lit(c)} AS {'varchar' if c == 'gameline' else 'bigint'})"
        for c in ("id", *rules.ST_RELATIONSHIP_KEY)
    )
    session.execute(text(f"""
        WITH ins AS (
            INSERT INTO st_relationships ({columns})
            SELECT {casts} FROM audit_changes ch
            WHERE ch.run_id = :run AND ch.entity = 'st_relationship'
            ORDER BY ch.entity_id
            ON CONFLICT (id) DO NOTHING
            RETURNING id
        )
        UPDATE audit_changes a SET undo_outcome = 'reverted' FROM ins
        WHERE a.run_id = :run AND a.entity = 'st_relationship' AND a.entity_id = ins.id
    """), {"run": run_id})
    session.execute(text(
        "UPDATE audit_changes SET undo_outcome = 'changed_since' WHERE run_id = :run "
        "AND entity = 'st_relationship' AND undo_outcome IS NULL"), {"run": run_id})
    return int(session.execute(text(
        "SELECT count(*) FROM audit_changes WHERE run_id = :run AND entity = 'st_relationship' "
        "AND undo_outcome = 'reverted'"), {"run": run_id}).scalar_one())


# -- reads ----------------------------------------------------------------------------------

def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """A job's result for a stored run: the run without its timestamps and undo (what
    audit.integrity returns; the inline CLI stores the same on its job row)."""
    keys = ("id", "mode", "checks", "findings", "reports", "fixed", "remaining",
            "changed_rows", "forced_status_changes", "totals", "rules_version")
    return {("run_id" if k == "id" else k): run[k] for k in keys}


_RUN_COLUMNS = ("id, job_id, mode, checks, rules_version, started_at, finished_at, findings, "
                "reports, fixed, remaining, changed_rows, totals, undone_at, undone_by, undo")


def _run_dict(row: Any) -> dict[str, Any]:
    out = dict(row._mapping)
    out["job_id"] = str(out["job_id"]) if out["job_id"] is not None else None
    out["checks"] = list(out["checks"])
    totals = dict(out["totals"] or {})
    out["forced_status_changes"] = int(totals.pop("_forced_status_changes", 0))
    out["totals"] = totals
    return out


def get_run(session: Session, run_id: int) -> dict[str, Any]:
    """One stored run (AuditRunNotFound if there is none)."""
    row = session.execute(text(f"SELECT {_RUN_COLUMNS} FROM audit_runs WHERE id = :id"),
                          {"id": run_id}).first()
    if row is None:
        raise AuditRunNotFound(f"no audit run {run_id}")
    return _run_dict(row)


def list_runs(session: Session, *, limit: int = 50,
              before_id: int | None = None) -> list[dict[str, Any]]:
    """Newest first; `before_id` pages back."""
    rows = session.execute(text(
        f"SELECT {_RUN_COLUMNS} FROM audit_runs WHERE (CAST(:b AS bigint) IS NULL OR id < :b) "
        "ORDER BY id DESC LIMIT :n"), {"b": before_id, "n": limit}).all()
    return [_run_dict(r) for r in rows]


def findings(session: Session, run_id: int, *, check: str | None = None, limit: int = 100,
             after: tuple[str, int] | None = None) -> list[dict[str, Any]]:
    """A run's findings ordered by (check, id), optionally of one check, after a cursor
    (the last (check, id) seen): the order of the table's primary key."""
    where = ["run_id = :run"]
    args: dict[str, Any] = {"run": run_id, "n": limit}
    if check is not None:
        where.append("check_name = :c")
        args["c"] = check
    if after is not None:
        where.append("(check_name, id) > (CAST(:ac AS varchar), CAST(:ai AS bigint))")
        args.update(ac=after[0], ai=after[1])
    rows = session.execute(text(
        "SELECT id, check_name AS check, rule, level, entity, entity_id, field, value, "
        f"expected, fix, fixable, outcome FROM audit_findings WHERE {' AND '.join(where)} "
        "ORDER BY check_name, id LIMIT :n"), args).all()
    return [dict(r._mapping) for r in rows]


def changes(session: Session, run_id: int, *, limit: int = 100,
            after_id: int | None = None) -> list[dict[str, Any]]:
    """A fix run's changed rows (before/after) in id order, after a cursor."""
    rows = session.execute(text(
        "SELECT id, entity, entity_id, action, before, after, forced_status, note, "
        "row_updated_at, undo_outcome FROM audit_changes WHERE run_id = :run "
        "AND (CAST(:a AS bigint) IS NULL OR id > :a) ORDER BY id LIMIT :n"),
        {"run": run_id, "a": after_id, "n": limit}).all()
    return [dict(r._mapping) for r in rows]


def encode_cursor(last: int | tuple[str, int]) -> str:
    """An opaque cursor for the next page: the last id seen, or a finding's (check, id)."""
    return base64.urlsafe_b64encode(json.dumps({"after": last}).encode()).decode()


def decode_cursor(cursor: str) -> int:
    """The id a list's cursor stands for; ValueError when it is not one of ours."""
    value = _cursor_value(cursor)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("invalid cursor")
    return value


def decode_finding_cursor(cursor: str) -> tuple[str, int]:
    """The (check, id) a findings cursor stands for; ValueError when it is not one."""
    value = _cursor_value(cursor)
    if (not isinstance(value, list) or len(value) != 2 or not isinstance(value[0], str)
            or not isinstance(value[1], int)):
        raise ValueError("invalid cursor")
    return value[0], value[1]


def _cursor_value(cursor: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(cursor.encode()))["after"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError("invalid cursor") from exc
