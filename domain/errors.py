"""Domain errors: each a clean failure with a permanent code (the job core records it)."""

from __future__ import annotations

from workers.errors import JobError


class DomainError(JobError):
    """Base of the character-data rule violations."""

    code = "domain_error"


class InsufficientXp(DomainError):
    code = "insufficient_xp"


class InvalidRequest(DomainError):
    code = "invalid_request"


class AlreadyProcessed(DomainError):
    code = "already_processed"


class OutOfOrder(DomainError):
    """A spend request's dot cannot be approved: the dot below it is not held."""

    code = "out_of_order"


class XpAlreadyGiven(DomainError):
    code = "xp_already_given"


class NotAParticipant(DomainError):
    code = "not_a_participant"


class InvalidTransition(DomainError):
    code = "invalid_transition"
