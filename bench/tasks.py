"""The bare Celery baseline: a no-op on the same app, queue and settings as every job.

Loaded by bench workers through WARDEN_EXTRA_TASK_MODULES, so production workers never
register it. It takes the same `params` kwarg as platform.ping so both messages are alike.
"""

from __future__ import annotations

from typing import Any

from workers.app import app

NOOP = "bench.noop"


@app.task(name=NOOP)
def noop(params: dict[str, Any] | None = None) -> None:
    """Do nothing: what remains is Celery's own cost per message."""
    return None
