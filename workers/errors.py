"""Error kinds the job core knows how to treat.

JobError: a clean, final failure with a stable code (recorded `failed`, never retried).
TransientError: worth another attempt (recorded `retrying`, then `dead` past the budget).
Domain errors subclass JobError, so workers/ never needs to import domain/.
"""

from __future__ import annotations

from typing import Any


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
