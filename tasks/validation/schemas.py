"""Params of the validation jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Characters(BaseModel):
    """Validate characters against every rule of domain/rules.py."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["full", "incremental"] = Field(
        "full", description="incremental: only characters changed since the last successful "
                            "sweep, skipping those whose cached verdict still holds")
    character_ids: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, max_length=100_000,
        description="validate only these characters (does not move the incremental watermark)",
    )


class Chunk(BaseModel):
    """One chunk of a fanned-out sweep: the candidates with ids in [id_from, id_to)."""

    model_config = ConfigDict(extra="forbid")

    sweep_id: int = Field(..., ge=1)
    id_from: int = Field(..., ge=0)
    id_to: int | None = Field(None, ge=1, description="exclusive; none: to the last id")


# -- what the API and the CLI show --------------------------------------------------------------

class SweepOut(BaseModel):
    """A validation sweep: its plan, counts (totals = the sum of its chunks) and watermark."""

    id: int
    job_id: str | None
    mode: str
    character_ids: list[int] | None
    status: str
    plan: str
    rules_version: str
    scan_from: datetime
    since: datetime | None
    started_at: datetime
    finished_at: datetime | None
    chunks: int
    totals: dict[str, Any] | None
    error: str | None


class SweepPage(BaseModel):
    items: list[SweepOut]
    next_cursor: str | None


class IssueOut(BaseModel):
    """One broken rule of one character: new (first_seen), persisting (last_seen), fixed
    (resolved_at)."""

    id: int
    character_id: int
    rule: str
    subject: str
    severity: str
    message: str
    first_seen: datetime
    last_seen: datetime
    resolved_at: datetime | None


class IssuePage(BaseModel):
    items: list[IssueOut]
    next_cursor: str | None
