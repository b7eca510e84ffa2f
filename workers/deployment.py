"""Which deployment a message belongs to: the identity of the database it was accepted into.

Why: several deployments can share a Redis (a restored copy checked beside the live one, a
staging stack, an operator's CLI with another WARDEN_DATABASE_URL). A job row lives in one
database; its message must only be run by workers of that database, or the live worker
runs a copy's `audit --fix` against the live data (operator drill D1). Every message
carries `STAMP_HEADER`; a worker compares it with its own identity and refuses a mismatch.

The identity is `pg:<system identifier>/<database name>` (pg_control_system(), readable by
any role): a restored copy on the same server differs by name, one on another server by
system identifier, and a promoted physical replica keeps both (a failover is the same
deployment). WARDEN_DEPLOYMENT replaces it where that is not what the operator wants.
"""

from __future__ import annotations

import os
import threading

import sqlalchemy.exc
import structlog
from sqlalchemy import text

from workers.settings import get_settings

log = structlog.get_logger("warden.deployment")

STAMP_HEADER = "warden_deployment"

_lock = threading.Lock()
_cached: dict[tuple[int, str], str] = {}


def identity() -> str:
    """This process's deployment identity (read from the database once per process)."""
    settings = get_settings()
    if settings.deployment:
        return settings.deployment
    dsn = settings.database_dsn()
    key = (os.getpid(), dsn)
    found = _cached.get(key)
    if found is not None:
        return found
    with _lock:
        if key not in _cached:
            _cached.clear()
            _cached[key] = _read_identity()
        return _cached[key]


def _read_identity() -> str:
    from workers.db import autocommit

    with autocommit() as conn:
        name = conn.execute(text("SELECT current_database()")).scalar_one()
        try:
            sysid = conn.execute(
                text("SELECT system_identifier FROM pg_control_system()")).scalar_one()
        except sqlalchemy.exc.ProgrammingError as exc:  # hidden by the server: say so
            log.warning("deployment.no_system_identifier", error=str(exc).splitlines()[0],
                        hint="set WARDEN_DEPLOYMENT to tell deployments apart")
            sysid = "unknown"
    return f"pg:{sysid}/{name}"


def forget() -> None:
    """Drop the cached identity (tests switch databases)."""
    with _lock:
        _cached.clear()


def stamp() -> dict[str, str]:
    """The headers every message of this deployment carries."""
    return {STAMP_HEADER: identity()}
