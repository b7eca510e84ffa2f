"""The integrity audit's checks, as counts, for a verification to run on a restored copy.

The one function verification calls. It runs the audit's own count queries
(domain.checks: one pass over characters per rule of DOMAIN.md checks 1-6, the duplicate
ST triples of check 7, the scene states of check 8), read-only: the audit's run_audit
would also store a run in the database it checks, and the live database must not gain an
audit run per verification. While domain.checks is not importable (the audit family landed
alongside this one), the same counts are computed from domain.rules directly, under the
same keys.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from domain import rules

ST_KEY = "st_relationship_unique"
SCENE_KEYS = ("xp_given_unfinished", "scene_awaiting_xp")


def source() -> str:
    """Which implementation integrity_counts uses ("domain.checks" or "domain.rules")."""
    try:
        from domain import checks

        checks.character_counts_sql, checks.scene_counts_sql, checks.st_duplicates_sql  # noqa: B018
    except (ImportError, AttributeError):
        return "domain.rules"
    return "domain.checks"


def integrity_counts(session: Session) -> dict[str, int]:
    """Rows breaking each integrity check (read-only: finds, never fixes)."""
    if source() == "domain.checks":
        from domain import checks

        counts = {k: int(v or 0) for k, v in
                  session.execute(text(checks.character_counts_sql())).mappings().one().items()}
        counts.update({k: int(v or 0) for k, v in
                       session.execute(text(checks.scene_counts_sql())).mappings().one().items()})
        counts[checks.ST_RULE] = int(
            session.execute(text(checks.st_duplicates_sql())).scalar_one() or 0)
        return counts
    return _from_rules(session)


def _from_rules(session: Session) -> dict[str, int]:
    checks = rules.check_sql()
    # A CHECK passes on NULL, so a NULL result is no finding here either.
    selects = ", ".join(
        f"count(*) FILTER (WHERE NOT coalesce(({expr}), true)) AS \"{name}\""
        for name, expr in checks.items()
    )
    row = session.execute(text(f"SELECT {selects} FROM characters")).mappings().one()
    counts = {name: int(row[name]) for name in checks}
    awaiting, unfinished = session.execute(text(
        "SELECT count(*) FILTER (WHERE finished AND NOT xp_given), "
        "count(*) FILTER (WHERE xp_given AND NOT finished) FROM scenes")).one()
    counts[SCENE_KEYS[0]] = int(unfinished)
    counts[SCENE_KEYS[1]] = int(awaiting)
    counts[ST_KEY] = int(session.execute(text(
        "SELECT count(*) - count(DISTINCT (user_id, chronicle_id, gameline)) "
        "FROM st_relationships")).scalar_one())
    return counts
