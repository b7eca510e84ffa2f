"""Alembic, driven from code: `warden db upgrade` and the test fixtures call this."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """A Config pointing at our migrations; url overrides the settings' database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


def upgrade(revision: str = "head", url: str | None = None) -> None:
    """Apply migrations up to revision (idempotent: a no-op when already there)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(revision: str, url: str | None = None) -> None:
    """Revert migrations down to revision."""
    command.downgrade(alembic_config(url), revision)
