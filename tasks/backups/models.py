"""The backups table: one row per backup attempt, its manifest, and its last verification.

Why a row per attempt (failed ones too): an operator asking "did last night's backup run?"
finds the answer and its error here, not only in job_runs. Only a `succeeded` row vouches
for a file; `pruned` rows keep the history (sizes, measured restore times) after the file
is gone.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    Identity,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from workers.db import Base

BACKUP_STATUSES = ("running", "succeeded", "failed", "pruned")
VERDICTS = ("passed", "failed")


class Backup(Base):
    """A pg_dump archive of the application database and what is known about it."""

    __tablename__ = "backups"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="running")
    # The backup.create job that made it (NULL when made outside the job system).
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    database: Mapped[str] = mapped_column(String(200), nullable=False)
    # Final path of the archive (the manifest sits beside it) and the temporary one it is
    # written to; pg_dump's pid and host let the next run stop an orphaned dump.
    path: Mapped[str] = mapped_column(Text, nullable=False)
    partial_path: Mapped[str] = mapped_column(Text, nullable=False)
    dump_host: Mapped[str | None] = mapped_column(String(200))
    dump_pid: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # now() of the exported snapshot pg_dump ran in: the data's point in time (RPO).
    snapshot_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    server_version: Mapped[str | None] = mapped_column(String(64))
    server_version_num: Mapped[int | None] = mapped_column(Integer)
    pg_dump_version: Mapped[str | None] = mapped_column(String(64))
    # {"schema.table": rows} counted in the dump's own snapshot.
    table_counts: Mapped[dict[str, int] | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    # Last verification: verdict, measured restore time (the backup's RTO) and the report
    # (steps, mismatches, integrity counts of the restored copy beside the live database's).
    verdict: Mapped[str | None] = mapped_column(String(16))
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    restore_seconds: Mapped[float | None] = mapped_column(Float)
    verify_report: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    verify_error: Mapped[str | None] = mapped_column(Text)
    # Set while a backup.verify job works on this backup; prune keeps the backup as long as
    # that job is unfinished in job_runs (a killed verification does not pin it forever).
    verify_job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    verify_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    pruned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in BACKUP_STATUSES) + ")", name="status"
        ),
        CheckConstraint(
            "verdict IS NULL OR verdict IN (" + ", ".join(f"'{v}'" for v in VERDICTS) + ")",
            name="verdict",
        ),
        CheckConstraint(
            "status NOT IN ('succeeded', 'pruned') OR (sha256 IS NOT NULL AND bytes IS NOT NULL "
            "AND table_counts IS NOT NULL AND snapshot_at IS NOT NULL)",
            name="complete_manifest",
        ),
        # One running backup at a time, whatever process runs it: never two interleaved.
        Index("uq_backups_one_running", text("(true)"), unique=True,
              postgresql_where=text("status = 'running'")),
        Index("ix_backups_status_snapshot", "status", "snapshot_at"),
        Index("ix_backups_job_id", "job_id"),
    )
