"""One settings object for every process: env vars with the WARDEN_ prefix, nothing else.

Why one class: operators configure the platform in one place (README, .env.example), and no
module reads os.environ behind its back.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "change-me", "changeme", "password", "admin", "secret", "dev"}
EMBEDDED_STATE_FILE = "services.json"


class SettingsError(RuntimeError):
    """Configuration that cannot work; the message is meant for an operator."""


class Settings(BaseSettings):
    """Runtime configuration. URLs left unset mean 'use the embedded servers of `warden up`'."""

    model_config = SettingsConfigDict(env_prefix="WARDEN_", env_file=".env", extra="ignore")

    database_url: SecretStr | None = None
    redis_url: SecretStr | None = None
    data_dir: Path = Path(".warden")
    env: Literal["dev", "prod"] = "dev"
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    flower_port: int = Field(5555, ge=1, le=65535)
    flower_user: str = "warden"
    flower_password: SecretStr | None = None
    timezone: str = "UTC"
    log_level: str = "INFO"
    # Prefix for every broker key in Redis, so deployments (or test runs) can share one
    # Redis database without seeing each other's queues.
    broker_key_prefix: str = Field("", max_length=100)
    # What every message is stamped with, and what a worker accepts: by default the
    # identity of the database (`pg:<system identifier>/<database name>`), so a command
    # pointed at another database (a restored copy) never has its job run against this one
    # (workers/deployment.py). Set it to keep one identity across a move the database does
    # not survive with the same system identifier (a pg_upgrade, a logical copy); a copy
    # of the database must then get another one.
    deployment: str | None = Field(None, min_length=1, max_length=200)
    # A message with no stamp and no job row (a bare `celery call`) is given a row and run
    # only where this is true; otherwise it is refused like another deployment's.
    adopt_bare_messages: bool = False
    # A worker that does not know a job's type leaves a job younger than this (s) to a
    # worker that does (a rolling deploy: sent again every quarter of it, at most 30 s),
    # then fails it `unknown_job_type` (a removed type; an operator retries it).
    unknown_type_grace: float = Field(600.0, ge=0)
    # Extra task modules for the worker (the test suite's fault-injection jobs).
    extra_task_modules: list[str] = Field(default_factory=list)

    # Job execution. Budget 5 with base 2 s and cap 300 s: a transient outage of ~1 minute is
    # ridden out before a job is declared dead.
    max_attempts: int = Field(5, ge=1, le=100)
    retry_backoff_base: float = Field(2.0, ge=0.0)
    retry_backoff_max: float = Field(300.0, ge=0.0)
    task_soft_time_limit: int = Field(3300, ge=1)
    task_time_limit: int = Field(3600, ge=1)
    # Redis redelivers an unacked message after this; it must exceed the hard limit or a
    # long job would be run twice at once.
    visibility_timeout: int | None = None
    # Job and singleton leases: TTL, renewed every third of it by the holder.
    lease_ttl: float = Field(15.0, gt=0.5)
    # The outbox relay: how often it looks, and how old an unpublished job must be before
    # the relay (not the request that accepted it) publishes it.
    relay_interval: float = Field(2.0, gt=0)
    relay_grace: float = Field(5.0, ge=0)
    # Backstop for messages lost after publishing: a job published this long ago and never
    # delivered, whose message is neither in its queue nor held by a worker, is published
    # again (a duplicate message is a no-op). Also how often a stuck job is re-sent at most.
    relay_lost_after: float = Field(60.0, gt=0)
    # Outcome writes (and claims) are retried on a fresh connection this long before the
    # run gives up on recording (a database restart takes seconds).
    outcome_retry_seconds: float = Field(30.0, ge=0)
    # Bearer tokens are cached (by hash) this long in each API process; revocation lag.
    token_cache_seconds: float = Field(10.0, ge=0)
    # Retention (platform.prune_jobs, nightly): finished jobs older than this many days are
    # deleted in batches; failed and dead ones (each may still need an operator) are kept
    # for job_retention_failed_days. Job statistics and schedule successes are kept apart
    # (job_stats) and survive the prune.
    # /metrics reads the job tables at most this often per API process (family gauges three
    # times less often): several Prometheus servers or a dashboard cost one read.
    metrics_cache_seconds: float = Field(5.0, ge=0)
    # /metrics answers only a bearer token with the `read` scope (review N18); off by
    # default: a scrape target on an internal network, as Prometheus expects.
    metrics_require_token: bool = False
    job_retention_days: int = Field(30, ge=1, le=3650)
    job_retention_failed_days: int = Field(90, ge=1, le=3650)

    # Data migrations (tasks/data_migrations, docs/jobs.md "migration.run").
    # Row-lock budget of one batch; the batch size adapts so a batch takes about half of
    # it (the slowest batches then stay under it; bench/migration_batched.py prints the
    # longest), between the min and max sizes. The first batch of a pass has the initial
    # size: 1,000 characters with legacy JSON take ~0.1 s on the shared 2-core machine (the
    # 1M bench settled on a median of ~5,000 per 0.5 s), so it starts well under budget.
    migration_batch_seconds: float = Field(1.0, gt=0, le=60)
    migration_batch_min: int = Field(10, ge=1)
    migration_batch_max: int = Field(100_000, ge=1)
    migration_batch_initial: int = Field(1000, ge=1)
    # A batch statement past this (or waiting for a row lock past the lock timeout) is split
    # in half and retried; at 1 row it counts as a failed try of the batch.
    migration_statement_timeout: float = Field(5.0, gt=0)
    migration_lock_timeout: float = Field(1.0, gt=0)
    # Tries of one batch on transient errors (with backoff) before the migration is failed;
    # runs of one pass (first run + automatic retries by migration.retry_failed).
    migration_batch_attempts: int = Field(5, ge=1, le=100)
    migration_max_attempts: int = Field(5, ge=1, le=1000)
    # Throttle before each batch: more sessions than this waiting for locks on the target
    # table, or a transaction open longer than this (VACUUM cannot clean up behind it).
    migration_max_lock_waits: int = Field(2, ge=0)
    migration_max_transaction_seconds: float = Field(300.0, gt=0)
    # How long a throttled run waits at most between two health checks.
    migration_throttle_max_wait: float = Field(10.0, gt=0)
    # A run works this long, then hands over to a fresh job at its checkpoint (under the
    # soft time limit, and no worker is held for hours); Shopify's maintenance_tasks do 5 min.
    migration_run_seconds: float = Field(600.0, gt=0)

    # Backups (tasks/backups). Archives go to backup_dir (default <data_dir>/backups);
    # pg_bin_dir names the PostgreSQL client tools to use (default: found, see
    # tasks/backups/pgtools.py). Retention keeps the newest backup of each of the last N
    # days, ISO weeks and months that have one (the 7/4/6). The RTO objective is
    # the seed's "critical: 1 hour" (shared/seeds/001); a verified restore slower than it
    # raises WardenBackupRestoreSlow.
    backup_dir: Path | None = None
    pg_bin_dir: Path | None = None
    backup_keep_daily: int = Field(7, ge=0, le=3660)
    backup_keep_weekly: int = Field(4, ge=0, le=520)
    backup_keep_monthly: int = Field(6, ge=0, le=1200)
    backup_rto_objective: float = Field(3600.0, gt=0)

    # Audits, validation and health reports (tasks/audits, tasks/validation, tasks/reports).
    # A fix waits at most this long (s) for each row lock; a writer holding one longer fails
    # the run (transient: it retries) instead of everything queuing behind the audit.
    audit_lock_timeout: float = Field(30.0, gt=0)
    # Cached verdicts live this long (s); the seed's character service used 3600.
    validation_cache_ttl: int = Field(3600, ge=1)
    # Characters per chunk of a fanned-out sweep (~1-2 s of work each on a 2-core machine,
    # bench/validation.py); a sweep with fewer candidates runs inline in one job.
    validation_chunk_size: int = Field(25_000, ge=10, le=1_000_000)
    # Incremental sweeps re-read this much (s) before the last sweep's start, for writes
    # whose transaction began before it and committed after (the cache skips the rest).
    validation_watermark_overlap: float = Field(300.0, ge=0)
    # A degraded health report is POSTed here (JSON); unset: no alert. A SecretStr: such
    # URLs often carry a token (Slack, PagerDuty). Each POST waits at most alert_timeout s.
    alert_webhook_url: SecretStr | None = None
    alert_timeout: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError("WARDEN_TASK_SOFT_TIME_LIMIT must be below WARDEN_TASK_TIME_LIMIT")
        if self.visibility_timeout is not None and self.visibility_timeout <= self.task_time_limit:
            raise ValueError("WARDEN_VISIBILITY_TIMEOUT must exceed WARDEN_TASK_TIME_LIMIT")
        if self.env == "prod":
            if self.flower_password is not None and is_placeholder(self.flower_password):
                raise ValueError("WARDEN_FLOWER_PASSWORD is a placeholder; refused in prod")
            if self.database_url is None or self.redis_url is None:
                raise ValueError("prod needs WARDEN_DATABASE_URL and WARDEN_REDIS_URL")
        return self

    @property
    def effective_visibility_timeout(self) -> int:
        """Default: the hard limit plus 10 minutes of slack."""
        return self.visibility_timeout or self.task_time_limit + 600

    def _embedded_state(self) -> dict[str, str]:
        path = self.data_dir / EMBEDDED_STATE_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def database_dsn(self) -> str:
        """The SQLAlchemy URL: the configured one, else the one `warden up` wrote."""
        if self.database_url is not None:
            return normalize_db_url(self.database_url.get_secret_value())
        url = self._embedded_state().get("database_url")
        if not url:
            raise SettingsError(
                "no database: set WARDEN_DATABASE_URL or start the embedded one with `warden up`"
            )
        return normalize_db_url(url)

    def libpq_dsn(self) -> str:
        """The database URL as libpq/psycopg take it (no SQLAlchemy driver suffix)."""
        return self.database_dsn().replace("postgresql+psycopg://", "postgresql://", 1)

    def redis_dsn(self) -> str:
        """The Redis URL: the configured one, else the one `warden up` wrote."""
        if self.redis_url is not None:
            return self.redis_url.get_secret_value()
        url = self._embedded_state().get("redis_url")
        if not url:
            raise SettingsError(
                "no Redis: set WARDEN_REDIS_URL or start the embedded one with `warden up`"
            )
        return url


def is_placeholder(secret: SecretStr) -> bool:
    """A value from the examples, or too short to be a real secret."""
    value = secret.get_secret_value()
    return value.lower() in PLACEHOLDER_SECRETS or len(value) < 12


def normalize_db_url(url: str) -> str:
    """Accept plain postgresql:// URLs and use psycopg 3 for them."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once."""
    return Settings()
