"""Params of the backup jobs, and the shape the API and CLI show a backup in."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def human_size(n: int | None) -> str:
    """A byte count as the CLI and the operations page show it (`12.3 MiB`; `-`: unknown)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class CreateBackup(BaseModel):
    """Back up the application database now."""

    model_config = ConfigDict(extra="forbid")

    verify: bool = Field(True, description="enqueue backup.verify of the new backup once it "
                                           "has succeeded (keyed by the backup id)")


class VerifyBackup(BaseModel):
    """Prove one backup restorable."""

    model_config = ConfigDict(extra="forbid")

    backup_id: int = Field(..., ge=1, description="the backup to verify (backups.id)")


class PruneBackups(BaseModel):
    """Apply the retention policy; limits left unset come from the settings."""

    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(False, description="only report what would be deleted")
    keep_daily: int | None = Field(None, ge=0, le=3660, description="WARDEN_BACKUP_KEEP_DAILY")
    keep_weekly: int | None = Field(None, ge=0, le=520,
                                    description="WARDEN_BACKUP_KEEP_WEEKLY")
    keep_monthly: int | None = Field(None, ge=0, le=1200,
                                     description="WARDEN_BACKUP_KEEP_MONTHLY")


class BackupOut(BaseModel):
    """One backup as the API returns it."""

    id: int
    status: str
    database: str
    path: str
    job_id: str | None
    started_at: datetime
    snapshot_at: datetime | None
    finished_at: datetime | None
    age_seconds: float | None
    bytes: int | None
    sha256: str | None
    server_version: str | None
    pg_dump_version: str | None
    error: str | None
    verdict: str | None
    verified_at: datetime | None
    restore_seconds: float | None
    verify_error: str | None
    verifying: bool
    pruned_at: datetime | None
    table_counts: dict[str, int] | None = None
    verify_report: dict[str, Any] | None = None
