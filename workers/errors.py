"""Error kinds the job core knows how to treat.

JobError: a clean, final failure with a stable code (recorded `failed`, never retried).
TransientError: worth another attempt (recorded `retrying`, then `dead` past the budget).
Domain errors subclass JobError, so workers/ never needs to import domain/.
`describe` is how any of them (and any other error) reads in job_runs and the logs.
"""

from __future__ import annotations

from typing import Any

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
