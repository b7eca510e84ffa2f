"""State of the data migrations, in Postgres: per migration, per batch, per pause, per reject.

Why in Postgres: the cursor must commit in the same transaction as the batch it follows
(a crash between them would re-apply or skip a batch), and operators read the same rows
through the API and the CLI.
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
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from workers.db import Base

MIGRATION_STATUSES: tuple[str, ...] = (
    "pending", "queued", "running", "paused", "failed", "cancelled", "succeeded", "reversing",
)
BATCH_STATUSES: tuple[str, ...] = ("succeeded", "split", "retrying", "failed")
PAUSE_KINDS: tuple[str, ...] = ("operator", "throttle")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class DataMigration(Base):
    """One registered migration: where it is (cursor), how far, how long, and why it stopped.

    `cursor` is the last key of the last committed batch (NULL: from the start). `run_no`
    counts passes over the data; `attempts` counts tries of the current pass (its first run
    and every retry after a failure), against `max_attempts` for the automatic retries.
    `changed_at` is when an operator or a run last changed `status`: a run asked for before
    a pause or cancel does not undo it (the latest decision wins).
    """

    __tablename__ = "data_migrations"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    run_no: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    cursor: Mapped[int | None] = mapped_column(BigInteger)
    rows_done: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    rows_total: Mapped[int | None] = mapped_column(BigInteger)
    rows_changed: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    rejected: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    batches_done: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    batch_size: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="5")
    last_error: Mapped[str | None] = mapped_column(Text)
    last_error_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    seconds_running: Mapped[float] = mapped_column(Float, nullable=False, server_default="0")
    seconds_paused: Mapped[float] = mapped_column(Float, nullable=False, server_default="0")
    seconds_throttled: Mapped[float] = mapped_column(Float, nullable=False, server_default="0")
    longest_batch_seconds: Mapped[float] = mapped_column(Float, nullable=False,
                                                         server_default="0")
    verify_remaining: Mapped[int | None] = mapped_column(BigInteger)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                 server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                 server_default=func.now())

    __table_args__ = (
        CheckConstraint(_in("status", MIGRATION_STATUSES), name="status"),
        CheckConstraint("rows_done >= 0 AND attempts >= 0", name="counts"),
    )


class DataMigrationBatch(Base):
    """One try of one batch: keys (lower_id, upper_id], rows, lock time, outcome.

    A batch split after a timeout keeps its row (status `split`); its halves get their own.
    """

    __tablename__ = "data_migration_batches"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    migration: Mapped[str] = mapped_column(
        String(100), ForeignKey("data_migrations.name", ondelete="CASCADE"), nullable=False
    )
    run_no: Mapped[int] = mapped_column(Integer, nullable=False)
    batch_no: Mapped[int] = mapped_column(Integer, nullable=False)
    lower_id: Mapped[int | None] = mapped_column(BigInteger)  # exclusive; NULL = the start
    upper_id: Mapped[int | None] = mapped_column(BigInteger)  # inclusive; NULL: not selected
    size: Mapped[int] = mapped_column(Integer, nullable=False)  # rows selected
    rows_changed: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    rejected: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    # From the transform's first statement to the end of its COMMIT: how long its row
    # locks were held (the adaptive size aims at a share of the time budget).
    seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                 server_default=func.now())

    __table_args__ = (
        CheckConstraint(_in("status", BATCH_STATUSES), name="status"),
        Index("ix_data_migration_batches_migration", "migration", "id"),
    )


class DataMigrationPause(Base):
    """A pause of a migration: by an operator, or by the health check (throttle)."""

    __tablename__ = "data_migration_pauses"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    migration: Mapped[str] = mapped_column(
        String(100), ForeignKey("data_migrations.name", ondelete="CASCADE"), nullable=False
    )
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    actor: Mapped[str | None] = mapped_column(String(100))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                 server_default=func.now())
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    seconds: Mapped[float | None] = mapped_column(Float)
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))

    __table_args__ = (
        CheckConstraint(_in("kind", PAUSE_KINDS), name="kind"),
        Index("ix_data_migration_pauses_migration", "migration", "id"),
    )


class DataMigrationReject(Base):
    """A source record a migration could not migrate, with why: never dropped silently.

    `position` is the record's index inside its row's field (-1: the field itself is not
    a list). Recomputed for a row whenever its batch runs again, so a fixed record leaves.
    """

    __tablename__ = "data_migration_rejects"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    migration: Mapped[str] = mapped_column(
        String(100), ForeignKey("data_migrations.name", ondelete="CASCADE"), nullable=False
    )
    run_no: Mapped[int] = mapped_column(Integer, nullable=False)
    row_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    record: Mapped[Any | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False,
                                                 server_default=func.now())

    __table_args__ = (
        UniqueConstraint("migration", "row_id", "position", name="uq_data_migration_rejects_row"),
    )
