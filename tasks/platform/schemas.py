"""Params of the platform jobs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Ping(BaseModel):
    """Echo a short string back: proves the path API -> Postgres -> Redis -> worker -> result."""

    model_config = ConfigDict(extra="forbid")

    echo: str = Field("pong", max_length=1000, description="returned as the result's echo")


class PruneJobs(BaseModel):
    """Delete finished jobs past their retention (WARDEN_JOB_RETENTION_DAYS, and
    WARDEN_JOB_RETENTION_FAILED_DAYS for failed and dead ones)."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(False, description="count what would be deleted; delete nothing")
    # 5,000 rows: ~50 ms of row locks on the 2-core machine (bench/metrics_scrape.py's
    # seeded table), small next to the 1 s lock budget the data migrations use.
    batch_size: int = Field(5000, ge=100, le=50_000)
