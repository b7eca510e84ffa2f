"""The operator log: who did what to how many, and why, in the caller's transaction.

Why in the caller's transaction: the record and the change it describes commit together,
so the log never claims an action that rolled back, nor misses one that committed.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session


class ReasonRequired(ValueError):
    """Operator actions need a reason (an empty one is refused)."""


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    reason: str,
    target: str | None = None,
    count: int = 0,
    details: dict[str, Any] | None = None,
) -> int:
    """Append one entry; returns its id."""
    if not reason or not reason.strip():
        raise ReasonRequired("a reason is required for operator actions")
    row = session.execute(
        text("INSERT INTO operator_log (actor, action, target, reason, count, details) "
             "VALUES (:a, :act, :t, :r, :c, CAST(:d AS jsonb)) RETURNING id"),
        {"a": actor[:100], "act": action[:64], "t": target, "r": reason.strip(), "c": count,
         "d": json.dumps(details, default=str) if details is not None else None},
    ).one()
    return int(row.id)


def entries(session: Session, *, limit: int = 50, before_id: int | None = None,
            action: str | None = None) -> list[dict[str, Any]]:
    """Newest first; `before_id` pages back."""
    where, args = ["true"], {"limit": limit}
    if before_id is not None:
        where.append("id < :before")
        args["before"] = before_id
    if action:
        where.append("action = :action")
        args["action"] = action  # type: ignore[assignment]
    rows = session.execute(
        text("SELECT id, at, actor, action, target, reason, count, details FROM operator_log "
             f"WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT :limit"), args,
    ).mappings().all()
    return [dict(r) for r in rows]
