"""Retention as a pure function: which backups to keep, and why, from a list of them.

Rules (each independent, as restic's --keep-daily/weekly/monthly): for each of the N most
recent days (ISO weeks, months) that have a usable backup, keep the newest backup of that
day (week, month). Calendar periods are in WARDEN_TIMEZONE, taken at the snapshot time.

Tied to verification: a backup whose verification FAILED fills no slot (it is proven not
restorable, so it must not push a good one out), and two backups are never deleted: the
newest one that passed verification, and any whose verification is running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo


@dataclass(frozen=True)
class Policy:
    """How many days, ISO weeks and months keep their newest backup."""

    daily: int = 7
    weekly: int = 4
    monthly: int = 6


@dataclass(frozen=True)
class Candidate:
    """What retention needs to know about one existing backup (status succeeded)."""

    id: int
    taken_at: datetime  # the snapshot time, timezone-aware
    verdict: str | None = None  # None (never verified), "passed", "failed"
    verifying: bool = False  # a backup.verify job on it is unfinished


@dataclass(frozen=True)
class Decision:
    """keep: id -> the reasons it stays; delete: ids that go, oldest first."""

    keep: dict[int, tuple[str, ...]] = field(default_factory=dict)
    delete: tuple[int, ...] = ()


def _buckets(tz: tzinfo) -> list[tuple[str, Callable[[datetime], str]]]:
    def day(t: datetime) -> str:
        return t.astimezone(tz).strftime("%Y-%m-%d")

    def week(t: datetime) -> str:
        year, number, _ = t.astimezone(tz).isocalendar()
        return f"{year}-W{number:02d}"

    def month(t: datetime) -> str:
        return t.astimezone(tz).strftime("%Y-%m")

    return [("daily", day), ("weekly", week), ("monthly", month)]


def decide(backups: Iterable[Candidate], policy: Policy, tz: tzinfo) -> Decision:
    """Split the backups into kept (with reasons) and deleted."""
    ordered = sorted(backups, key=lambda b: (b.taken_at, b.id), reverse=True)  # newest first
    reasons: dict[int, list[str]] = {b.id: [] for b in ordered}
    usable = [b for b in ordered if b.verdict != "failed"]
    limits = {"daily": policy.daily, "weekly": policy.weekly, "monthly": policy.monthly}
    for rule, bucket_of in _buckets(tz):
        seen: set[str] = set()
        for b in usable:
            bucket = bucket_of(b.taken_at)
            if bucket in seen:
                continue
            if len(seen) >= limits[rule]:
                break
            seen.add(bucket)
            reasons[b.id].append(f"{rule} {bucket}")
    newest_verified = next((b for b in ordered if b.verdict == "passed"), None)
    if newest_verified is not None:
        reasons[newest_verified.id].append("newest verified")
    for b in ordered:
        if b.verifying:
            reasons[b.id].append("verification running")
    keep = {b.id: tuple(reasons[b.id]) for b in ordered if reasons[b.id]}
    delete = tuple(b.id for b in reversed(ordered) if not reasons[b.id])
    return Decision(keep=keep, delete=delete)
