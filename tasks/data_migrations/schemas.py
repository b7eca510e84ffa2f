"""Params of the data-migration jobs; a migration name must be a registered one."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.data_migrations import registry
from workers.scopes import PRINCIPAL_FIELD


def _enum_names(schema: dict[str, Any]) -> None:
    """Name the registered migrations in the params' JSON Schema (job-type catalogue, OpenAPI):
    the validator below enforces them, and a client must see what it accepts."""
    schema["enum"] = list(registry.names())


def _known(name: str) -> str:
    if name not in registry.names():
        raise ValueError(f"unknown migration {name!r}; known: {', '.join(registry.names())}")
    return name


class MigrationRun(BaseModel):
    """Run a data migration from its checkpoint to the end (or a pause, cancel, failure)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=100, description="a registered migration",
                      json_schema_extra=_enum_names)
    batch_size: int | None = Field(
        None, ge=1, le=1_000_000,
        description="rows per batch, fixed (split only on a timeout); default: adapts to "
                    "WARDEN_MIGRATION_BATCH_SECONDS",
    )
    dry_run: bool = Field(False, description="transform each batch and roll it back: "
                                             "counts what would change, changes nothing")

    _name = field_validator("name")(_known)


class MigrationReverse(BaseModel):
    """Undo what a data migration made and set it back to pending."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=100, description="a registered, reversible migration",
                      json_schema_extra=_enum_names)
    reason: str = Field(min_length=1, max_length=500, description="why (operator log)")
    # Who asked, for the operator log: set by whoever submits the job from its principal
    # (workers.scopes.on_behalf_of), never a client's choice. Kept as a field so that jobs
    # queued with one still validate; absent, the log names the job itself.
    actor: str | None = Field(None, max_length=100,
                              description="set by Warden to the submitting principal (the "
                                          "API token's name, or cli:<login>); a value sent "
                                          "by a client is replaced",
                              json_schema_extra=PRINCIPAL_FIELD)

    _name = field_validator("name")(_known)


class RetryFailed(BaseModel):
    """Retry every failed migration whose attempt budget is not spent (beat, hourly)."""

    model_config = ConfigDict(extra="forbid")
