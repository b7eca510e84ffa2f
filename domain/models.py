"""The character data as tables. Ranges and statuses come from domain.rules.

Range and status CHECK constraints are added by the migration as NOT VALID: every new write
must obey them, while rows that predate them stay readable for the integrity audit to find
and fix (docs/data-model.md lists which rule is enforced where).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column, relationship

from domain import rules
from workers.db import Base


def _trait(default: int | None) -> Mapped[int | None]:
    return mapped_column(
        SmallInteger, nullable=default is None,
        server_default=str(default) if default is not None else None,
    )


scene_participants = Table(
    "scene_participants",
    Base.metadata,
    Column("scene_id", BigInteger, ForeignKey("scenes.id", ondelete="CASCADE"), primary_key=True),
    Column(
        "character_id", BigInteger, ForeignKey("characters.id", ondelete="CASCADE"),
        primary_key=True, index=True,
    ),
)


class Character(Base):
    """A player character or NPC, with its traits as columns (one row, one lock)."""

    __tablename__ = "characters"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    owner_id: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    chronicle_id: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    status: Mapped[str] = mapped_column(
        String(8), nullable=False, server_default=rules.DEFAULT_STATUS
    )
    xp: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    npc: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    concept: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # Bumped by a trigger on every UPDATE, whoever writes: incremental jobs rely on it.
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )
    # Legacy spend history (two shapes, see DOMAIN.md); a data migration moves it to rows.
    spent_xp: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONB)

    strength: Mapped[int] = _trait(1)  # type: ignore[assignment]
    dexterity: Mapped[int] = _trait(1)  # type: ignore[assignment]
    stamina: Mapped[int] = _trait(1)  # type: ignore[assignment]
    perception: Mapped[int] = _trait(1)  # type: ignore[assignment]
    intelligence: Mapped[int] = _trait(1)  # type: ignore[assignment]
    wits: Mapped[int] = _trait(1)  # type: ignore[assignment]
    charisma: Mapped[int] = _trait(1)  # type: ignore[assignment]
    manipulation: Mapped[int] = _trait(1)  # type: ignore[assignment]
    appearance: Mapped[int] = _trait(1)  # type: ignore[assignment]
    alertness: Mapped[int] = _trait(0)  # type: ignore[assignment]
    athletics: Mapped[int] = _trait(0)  # type: ignore[assignment]
    brawl: Mapped[int] = _trait(0)  # type: ignore[assignment]
    empathy: Mapped[int] = _trait(0)  # type: ignore[assignment]
    expression: Mapped[int] = _trait(0)  # type: ignore[assignment]
    intimidation: Mapped[int] = _trait(0)  # type: ignore[assignment]
    streetwise: Mapped[int] = _trait(0)  # type: ignore[assignment]
    subterfuge: Mapped[int] = _trait(0)  # type: ignore[assignment]
    crafts: Mapped[int] = _trait(0)  # type: ignore[assignment]
    drive: Mapped[int] = _trait(0)  # type: ignore[assignment]
    etiquette: Mapped[int] = _trait(0)  # type: ignore[assignment]
    firearms: Mapped[int] = _trait(0)  # type: ignore[assignment]
    melee: Mapped[int] = _trait(0)  # type: ignore[assignment]
    stealth: Mapped[int] = _trait(0)  # type: ignore[assignment]
    academics: Mapped[int] = _trait(0)  # type: ignore[assignment]
    computer: Mapped[int] = _trait(0)  # type: ignore[assignment]
    investigation: Mapped[int] = _trait(0)  # type: ignore[assignment]
    medicine: Mapped[int] = _trait(0)  # type: ignore[assignment]
    science: Mapped[int] = _trait(0)  # type: ignore[assignment]
    willpower: Mapped[int] = _trait(3)  # type: ignore[assignment]
    temporary_willpower: Mapped[int] = _trait(3)  # type: ignore[assignment]
    age: Mapped[int | None] = _trait(None)
    apparent_age: Mapped[int | None] = _trait(None)

    scenes: Mapped[list[Scene]] = relationship(
        secondary=scene_participants, back_populates="participants"
    )


class Scene(Base):
    """A played scene; `xp_given` flips once, in the transaction that awards the XP."""

    __tablename__ = "scenes"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    chronicle_id: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    date_played: Mapped[date | None] = mapped_column(Date)
    finished: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    xp_given: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    participants: Mapped[list[Character]] = relationship(
        secondary=scene_participants, back_populates="scenes"
    )

    __table_args__ = (
        Index("ix_scenes_awaiting_xp", "id", postgresql_where="finished AND NOT xp_given"),
    )


class XpSpendRequest(Base):
    """A request to raise a trait, paid up front; approval sets the trait, denial refunds."""

    __tablename__ = "xp_spend_requests"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    character_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("characters.id", ondelete="CASCADE"), nullable=False, index=True
    )
    trait_name: Mapped[str] = mapped_column(String(64), nullable=False)
    trait_type: Mapped[str] = mapped_column(String(16), nullable=False)
    trait_value: Mapped[int] = mapped_column(Integer, nullable=False)
    cost: Mapped[int] = mapped_column(Integer, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, server_default="Pending")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    decided_by: Mapped[int | None] = mapped_column(BigInteger)
    # Set by the legacy spent_xp migration: makes it resumable without duplicates.
    legacy_ref: Mapped[str | None] = mapped_column(String(200))

    __table_args__ = (
        CheckConstraint("cost > 0", name="cost_positive"),
        CheckConstraint(
            "state IN (" + ", ".join(f"'{s}'" for s in rules.SPEND_STATES) + ")", name="state"
        ),
        CheckConstraint(
            "trait_type IN (" + ", ".join(f"'{s}'" for s in rules.TRAIT_TYPES) + ")",
            name="trait_type",
        ),
        CheckConstraint("(state = 'Pending') = (decided_at IS NULL)", name="decided"),
        UniqueConstraint("character_id", "legacy_ref", name="uq_xp_spend_requests_legacy"),
        Index("ix_xp_spend_requests_state_created", "state", "created_at"),
    )


class WeeklyXpRequest(Base):
    """A weekly claim of up to five XP, one per category; approved at most once."""

    __tablename__ = "weekly_xp_requests"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    character_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("characters.id", ondelete="CASCADE"), nullable=False
    )
    week: Mapped[date] = mapped_column(Date, nullable=False)
    finishing: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    learning: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    learning_scene_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("scenes.id"))
    rp: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    rp_scene_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("scenes.id"))
    focus: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    focus_scene_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("scenes.id"))
    standingout: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    standingout_scene_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("scenes.id"))
    approved: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    approved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    approved_by: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    __table_args__ = (
        UniqueConstraint("character_id", "week", name="uq_weekly_xp_requests_character_week"),
        *(
            CheckConstraint(f"NOT {c} OR {c}_scene_id IS NOT NULL", name=f"{c}_scene")
            for c in rules.WEEKLY_NEEDS_SCENE
        ),
    )


class StRelationship(Base):
    """A storyteller's (user, chronicle, gameline). Unique by rule; the audit removes dups,
    since legacy data has them (a unique index would refuse to build until then)."""

    __tablename__ = "st_relationships"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    chronicle_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    gameline: Mapped[str] = mapped_column(String(64), nullable=False)

    __table_args__ = (Index("ix_st_relationships_triple", "user_id", "chronicle_id", "gameline"),)


class XpLedger(Base):
    """Every XP movement, written in the same transaction as the change to characters.xp."""

    __tablename__ = "xp_ledger"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    character_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("characters.id", ondelete="CASCADE"), nullable=False, index=True
    )
    delta: Mapped[int] = mapped_column(Integer, nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    scene_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("scenes.id"))
    spend_request_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("xp_spend_requests.id")
    )
    weekly_request_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("weekly_xp_requests.id")
    )
    job_id: Mapped[Any | None] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    __table_args__ = (
        CheckConstraint(
            "kind IN (" + ", ".join(f"'{s}'" for s in rules.XP_LEDGER_KINDS) + ")", name="kind"
        ),
        CheckConstraint("delta <> 0", name="delta_nonzero"),
    )
