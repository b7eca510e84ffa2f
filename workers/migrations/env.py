"""Alembic environment. Model modules are named, not imported statically (workers/ does not
import domain/), so autogenerate still sees every table."""

import importlib
import importlib.util
import pkgutil

from alembic import context
from sqlalchemy import create_engine, pool

from workers.db import Base
from workers.settings import get_settings, normalize_db_url


def _model_modules() -> list[str]:
    """The platform's and domain's models, and every family's `tasks/<family>/models.py`."""
    found = ["workers.models", "domain.models"]
    spec = importlib.util.find_spec("tasks")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for info in pkgutil.iter_modules(locations):
        if info.ispkg and importlib.util.find_spec(f"tasks.{info.name}.models") is not None:
            found.append(f"tasks.{info.name}.models")
    return found


for module in _model_modules():
    importlib.import_module(module)

target_metadata = Base.metadata
config = context.config


def _url() -> str:
    url = config.attributes.get("url")
    return normalize_db_url(url) if url else get_settings().database_dsn()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        # One transaction for the whole upgrade: a failed migration leaves nothing half-done.
        context.configure(connection=connection, target_metadata=target_metadata,
                          transaction_per_migration=False)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
