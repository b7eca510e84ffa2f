"""Params of the audit jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from domain import rules
from workers.scopes import PRINCIPAL_FIELD


def _enum_items(schema: dict[str, Any], names: tuple[str, ...]) -> None:
    """Name the allowed checks in the job-type catalogue's JSON Schema (the validator below
    enforces them; a Literal would restate the list)."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "array":
            option["items"]["enum"] = list(names)


# What the reason validator below enforces, in the params' JSON Schema (the catalogue,
# OpenAPI): with fix true, a reason with something besides blanks.
_REASON_WITH_FIX: dict[str, Any] = {
    "if": {"properties": {"fix": {"const": True}}, "required": ["fix"]},
    "then": {"properties": {"reason": {"type": "string", "pattern": r"\S"}},
             "required": ["reason"]},
}


class Integrity(BaseModel):
    """Run DOMAIN.md's integrity checks, and optionally fix what they find."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_REASON_WITH_FIX)

    fix: bool = Field(False, description="apply every fix in one transaction, recording each "
                                         "changed row's before and after values")
    checks: list[str] | None = Field(
        None, min_length=1, max_length=len(rules.INTEGRITY_CHECKS),
        description="run only these checks (default: all eight)",
        json_schema_extra=lambda schema: _enum_items(schema, rules.INTEGRITY_CHECKS),
    )

    # A fix rewrites characters and queues awards: an operator action (D3), so it says why,
    # and who asked goes with it to the operator log. Checking needs neither.
    reason: str | None = Field(None, max_length=500, validate_default=True,
                               description="why (operator log); required when fix is true")
    actor: str | None = Field(None, max_length=100,
                              description="set by Warden to the submitting principal (the "
                                          "API token's name, or cli:<login>); a value sent "
                                          "by a client is replaced",
                              json_schema_extra=PRINCIPAL_FIELD)

    @field_validator("reason", mode="after")
    @classmethod
    def _reason_for_a_fix(cls, value: str | None, info: ValidationInfo) -> str | None:
        reason = value.strip() if value else None
        if info.data.get("fix") and not reason:
            raise ValueError("a fix is an operator action: give the reason (operator log)")
        return reason

    @field_validator("checks")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        unknown = [c for c in value if c not in rules.INTEGRITY_CHECKS]
        if unknown:
            raise ValueError(f"unknown check {unknown[0]!r}; known: "
                             f"{', '.join(rules.INTEGRITY_CHECKS)}")
        return [c for c in rules.INTEGRITY_CHECKS if c in value]  # DOMAIN.md order, no dups


# -- what the API and the CLI show --------------------------------------------------------------

class AuditRunOut(BaseModel):
    """A stored audit run: what was asked, its totals per check, and its undo if any."""

    id: int
    job_id: str | None
    mode: str
    checks: list[str]
    rules_version: str
    started_at: datetime
    finished_at: datetime
    findings: int = Field(description="broken rules found (reports excluded)")
    reports: int = Field(description="states reported, not broken (finished scenes awaiting XP)")
    fixed: int
    remaining: int = Field(description="findings still to fix after this run")
    changed_rows: int
    forced_status_changes: int
    totals: dict[str, dict[str, int]]
    undone_at: datetime | None
    undone_by: str | None
    undo: dict[str, Any] | None


class FindingOut(BaseModel):
    id: int
    check: str
    rule: str
    level: str
    entity: str
    entity_id: int
    field: str
    value: Any
    expected: str
    fix: Any = Field(description="the value the rule's fix gives the found value (null: "
                                 "unknown, or a deleted row)")
    fixable: bool
    outcome: str | None


class FindingPage(BaseModel):
    items: list[FindingOut]
    next_cursor: str | None


class AuditRunDetail(BaseModel):
    run: AuditRunOut
    findings: FindingPage


class AuditRunPage(BaseModel):
    items: list[AuditRunOut]
    next_cursor: str | None


class ChangeOut(BaseModel):
    id: int
    entity: str
    entity_id: int
    action: str
    before: dict[str, Any]
    after: dict[str, Any] | None
    forced_status: bool
    note: str | None
    row_updated_at: datetime | None
    undo_outcome: str | None


class ChangePage(BaseModel):
    items: list[ChangeOut]
    next_cursor: str | None
