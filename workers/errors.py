"""Error kinds the job core knows how to treat.

JobError: a clean, final failure with a stable code (recorded `failed`, never retried).
TransientError: worth another attempt (recorded `retrying`, then `dead` past the budget).
Domain errors subclass JobError, so workers/ never needs to import domain/.
`describe` is how any of them (and any other error) reads in job_runs and the logs.
TRANSIENT_EXCEPTIONS / `is_transient`: the one place that says which errors of the
infrastructure (not the job's) are worth another attempt, for every family alike.
"""

from __future__ import annotations

from typing import Any

import psycopg
import redis
import sqlalchemy.exc


class JobError(Exception):
    """A job that cannot succeed as asked; `code` is machine-readable and permanent."""

    code: str = "job_error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.details = details


class TransientError(Exception):
    """Raise from a job to ask for a retry with backoff (a dependency hiccup)."""



# What a retry can cure, wherever it is raised: SQLAlchemy's wrappers and the raw psycopg
# errors a family meets on a connection of its own (backups: the advisory-lock, snapshot and
# scratch connections; review N4a): a restarted server or a terminated backend
# (AdminShutdown), a refused connection, a deadlock or serialization failure, a statement or
# lock timeout (all psycopg.OperationalError), a dropped connection (InterfaceError).
TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    TransientError,
    sqlalchemy.exc.OperationalError,  # connection lost, deadlock, lock timeout, serialization
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,  # pool exhausted
    psycopg.OperationalError,
    psycopg.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is the infrastructure's passing trouble (retry), not the job's."""
    return isinstance(exc, TRANSIENT_EXCEPTIONS)


class OwnershipLost(Exception):
    """This run no longer owns its job: its lease lapsed (a stall, a partition) and another
    run claimed the job with a newer epoch. Nothing of this run commits; the core ends the
    delivery without recording anything (the new owner records the outcome)."""


def describe(exc: BaseException) -> str:
    """An error message fit for job_runs and Flower: the driver's first line, never the SQL
    statement and its parameters that SQLAlchemy appends."""
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
        inner = exc.orig
        first = (str(inner).strip().splitlines() or [""])[0]
        return f"{type(inner).__name__}: {first}"[:2000]
    return f"{type(exc).__name__}: {exc}"[:2000]
