"""What the CLI says when a job it waits for has not finished: where it stands and whether
any worker of this deployment could run it.

Why: an operator whose command pointed at another database (a restored copy) once read
"not finished after 20s (still running)" while the job sat queued in that database and a
worker of another deployment had refused its message (operator drill D1).
"""

from __future__ import annotations

from typing import Any


def _workers(queue: str) -> str:
    from workers import deployment, liveness

    try:
        live = [w for w in liveness.live_workers() if queue in (w.get("queues") or [])]
    except Exception as exc:  # Redis away: say so rather than guess
        return f"cannot tell which workers consume queue {queue!r} (Redis: {type(exc).__name__})"
    if not live:
        return f"no worker consumes queue {queue!r}"
    try:
        mine = deployment.identity()
    except Exception:
        mine = None
    ours = [w for w in live if liveness.serves_here(w, mine)]
    if not ours:
        theirs = sorted({str(w.get("deployment")) for w in live})
        return (f"{len(live)} worker(s) consume queue {queue!r} but serve another deployment "
                f"({', '.join(theirs)}), not this database ({mine}): they refuse its message; "
                "start a worker for this database, or run the command with --inline")
    return f"{len(ours)} worker(s) of this deployment consume queue {queue!r}"


def not_finished(job_id: Any, timeout: float) -> str:
    """One line: the job's status, why it may not be running, and what to look at."""
    from workers import jobstore
    from workers.celery_app import QUEUE

    row = jobstore.get(str(job_id))
    status = row["status"] if row is not None else "unknown"
    return (f"job {job_id} not finished after {timeout:.0f}s: it is still {status}; "
            f"{_workers(QUEUE)} (see `warden job {job_id}`)")
