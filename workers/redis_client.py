"""The process's Redis client for locks, leases and caches (the broker has its own pool)."""

from __future__ import annotations

import os

import redis

from workers.settings import get_settings

_client: redis.Redis | None = None
_pid: int | None = None


def get_redis() -> redis.Redis:
    """A client per process (re-created after fork); short timeouts so a dead Redis fails fast."""
    global _client, _pid
    if _client is None or _pid != os.getpid():
        _client = redis.Redis.from_url(
            get_settings().redis_dsn(),
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=30,
            decode_responses=True,
        )
        _pid = os.getpid()
    return _client


def reset_redis() -> None:
    """Forget the client (tests switch servers)."""
    global _client
    if _client is not None:
        _client.close()
    _client = None


def key(name: str) -> str:
    """A Redis key of the platform's, under WARDEN_BROKER_KEY_PREFIX like the broker's own:
    two deployments sharing one Redis database never see each other's leases or caches.
    `name` is relative: key("lease:relay") -> "<prefix>warden:lease:relay"."""
    return f"{get_settings().broker_key_prefix}warden:{name}"


def broker_key(name: str) -> str:
    """A key of the broker's own (kombu applies the same global prefix): its queues."""
    return f"{get_settings().broker_key_prefix}{name}"
