"""What a data migration is, the health checks that throttle it, and the registry by name.

A migration walks its source table by key (keyset pagination: `WHERE id > cursor ORDER BY
id LIMIT n`, an index range scan however far it has got, where OFFSET would rescan), and
changes each batch in one transaction. Its transform must be idempotent per batch (a
batch can be retried after a timeout), and `verify` is its post-condition: how many rows
still need migrating; the migration succeeds only when that is zero.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.orm import Session

from workers.settings import get_settings


@dataclass(frozen=True)
class Batch:
    """Keys (lower, upper] of the source table: `size` rows selected."""

    lower: int | None  # exclusive; None = from the first row
    upper: int  # inclusive
    size: int


@dataclass(frozen=True)
class Context:
    """Who is transforming: the migration, its pass (run_no) and the job (for audit columns)."""

    name: str
    run_no: int
    job_id: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What a batch's transform did: rows changed, records rejected (and left in place)."""

    changed: int
    rejected: int = 0


class HealthCheck(Protocol):
    """Asked before every batch; a reason (str) pauses the run until it answers None."""

    @property
    def name(self) -> str: ...

    def __call__(self, session: Session, table: str) -> str | None: ...


@dataclass(frozen=True)
class LockWaits:
    """Sessions waiting for a lock while touching the target table.

    Between two batches the migration holds no row locks, so these waits are the
    application's own; a queue forming there is the moment to yield.
    """

    name: str = "lock_waits"
    limit: int | None = None  # None: WARDEN_MIGRATION_MAX_LOCK_WAITS

    def __call__(self, session: Session, table: str) -> str | None:
        limit = get_settings().migration_max_lock_waits if self.limit is None else self.limit
        waiting = int(session.execute(text(
            "SELECT count(DISTINCT w.pid) FROM pg_locks w JOIN pg_locks t ON t.pid = w.pid "
            "WHERE NOT w.granted AND t.relation = CAST(:t AS regclass) "
            "AND w.pid <> pg_backend_pid()"
        ), {"t": table}).scalar_one())
        if waiting > limit:
            return f"{waiting} sessions waiting for locks on {table} (limit {limit})"
        return None


@dataclass(frozen=True)
class LongTransactions:
    """The database's longest-running transaction.

    While one is open, VACUUM cannot remove the row versions a migration's batches leave
    behind, so they pile up; the run waits for it to end.
    """

    name: str = "longest_transaction"
    limit_seconds: float | None = None  # None: WARDEN_MIGRATION_MAX_TRANSACTION_SECONDS

    def __call__(self, session: Session, table: str) -> str | None:
        limit = (get_settings().migration_max_transaction_seconds
                 if self.limit_seconds is None else self.limit_seconds)
        row = session.execute(text(
            "SELECT pid, extract(epoch FROM now() - xact_start) AS age FROM pg_stat_activity "
            "WHERE datname = current_database() AND xact_start IS NOT NULL "
            "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
            "ORDER BY xact_start LIMIT 1"
        )).first()
        if row is not None and float(row.age) > limit:
            return (f"transaction of pid {row.pid} open for {float(row.age):.0f} s "
                    f"(limit {limit:.0f} s)")
        return None


DEFAULT_HEALTH_CHECKS: tuple[HealthCheck, ...] = (LockWaits(), LongTransactions())


@dataclass(frozen=True)
class Migration:
    """A registered data migration. The callables take the batch's session.

    select_next(session, after, size) -> Batch | None: the next keyset batch.
    transform(session, context, batch) -> Outcome: change one batch (idempotent).
    verify(session) -> int: rows still to migrate (0 = done).
    estimate(session) -> int: rows the selector will visit (for progress and ETA).
    reverse(session, batch) -> int: undo one batch (None: not reversible).
    """

    name: str
    description: str
    table: str  # the source table: what the lock-wait check watches
    select_next: Callable[[Session, int | None, int], Batch | None]
    transform: Callable[[Session, Context, Batch], Outcome]
    verify: Callable[[Session], int]
    estimate: Callable[[Session], int]
    reverse: Callable[[Session, Batch], int] | None = None
    health_checks: tuple[HealthCheck, ...] = field(default=DEFAULT_HEALTH_CHECKS)


def keyset_selector(table: str, where: str = "true") -> Callable[[Session, int | None, int],
                                                                 Batch | None]:
    """select_next over `table`'s bigint id with a constant filter (module constants only).

    One index-range scan: the next `size` ids after the cursor, and the last of them.
    """

    def select_next(session: Session, after: int | None, size: int) -> Batch | None:
        row = session.execute(text(
            f"SELECT count(*) AS n, max(id) AS upper FROM (SELECT id FROM {table} "
            f"WHERE id > :after AND ({where}) ORDER BY id LIMIT :size) b"
        ), {"after": after if after is not None else -1, "size": size}).one()
        if not row.n:
            return None
        return Batch(after, int(row.upper), int(row.n))

    return select_next


_REGISTRY: dict[str, Migration] = {}


def register(migration: Migration) -> Migration:
    """Add a migration; names are permanent (state rows refer to them)."""
    if migration.name in _REGISTRY and _REGISTRY[migration.name] is not migration:
        raise ValueError(f"migration {migration.name!r} is registered twice")
    _REGISTRY[migration.name] = migration
    return migration


MODULES = ("tasks.data_migrations.spent_xp", "tasks.data_migrations.opening_balances")


def _load() -> None:
    """Import the real migrations (each registers itself), once."""
    for module in MODULES:
        importlib.import_module(module)


def get(name: str) -> Migration:
    """The migration named `name`; KeyError (with the known names) if none is."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown migration {name!r}; known: {', '.join(sorted(_REGISTRY))}")\
            from None


def names() -> list[str]:
    """Every registered migration's name, sorted."""
    _load()
    return sorted(_REGISTRY)
