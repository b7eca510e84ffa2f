"""Domain errors: each a clean failure with a permanent code (the job core records it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy.exc

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


class CharacterRuleViolation(DomainError):
    """A character the change touches breaks a rule of its own (a legacy row that predates
    the rule's NOT VALID constraint): PostgreSQL refuses any UPDATE of that row until the
    audit fixes it. Not the job's fault and not transient, so a clean failure that names
    the character, the rule and what to do (review 2026-12-07, drill D4)."""

    code = "character_rule_violation"

    @classmethod
    def from_integrity_error(cls, exc: BaseException) -> CharacterRuleViolation | None:
        """The violation a CHECK refusal on characters stands for; None for any other error.

        The character is the first column of the failing row PostgreSQL reports (its id);
        the rule is the constraint's name without its `ck_characters_` prefix.
        """
        import re

        from domain import checks

        diag = getattr(getattr(exc, "orig", None), "diag", None)
        if diag is None or getattr(exc.orig, "sqlstate", None) != "23514":  # type: ignore[attr-defined]
            return None
        constraint = diag.constraint_name or ""
        if diag.table_name != "characters" or not constraint.startswith(_CHARACTER_CK):
            return None
        key = constraint.removeprefix(_CHARACTER_CK)
        rule = checks.RULES_BY_KEY.get(key)
        found = re.match(r"Failing row contains \((\d+),", diag.message_detail or "")
        who = f"character {found.group(1)}" if found else "a character of this change"
        what = f" ({rule.field} must be {rule.expected}; audit check {rule.check})" if rule else ""
        return cls(
            f"{who} breaks rule {key}{what}, so PostgreSQL refuses to change the row. "
            "It is legacy data, not this job's fault: run `warden audit --fix --reason ...` "
            "(it fixes the row, recorded and undoable), then retry this job (a fix retries a "
            "failed scene award itself)",
            character_id=int(found.group(1)) if found else None, rule=key,
            constraint=constraint)


_CHARACTER_CK = "ck_characters_"


@contextmanager
def character_rules_named() -> Iterator[None]:
    """Turn PostgreSQL's refusal of a characters row that breaks a rule into
    CharacterRuleViolation (any other error passes through unchanged)."""
    try:
        yield
    except sqlalchemy.exc.IntegrityError as exc:
        violation = CharacterRuleViolation.from_integrity_error(exc)
        if violation is None:
            raise
        raise violation from exc
