"""Leases in Redis: a token, a TTL, renewal by the holder, and release only by the holder.

Since ADR 0007 these are an optimisation only (which relay works this pass); job ownership
and singletons are guarded in Postgres. Why not a plain SETNX lock: a crashed holder must
not block forever (TTL), a live holder keeps its lease past the TTL (renewal thread), and a
holder whose lease expired must not delete its successor's (compare-and-delete in Lua). A
holder provably dead on this kernel (workers.identity) is taken over at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import cast

import redis

from workers import identity
from workers.redis_client import get_redis
from workers.settings import get_settings

log = logging.getLogger(__name__)

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_STEAL = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1
end
return 0
"""


@dataclass
class Lease:
    """A held lease. `lost` turns true if renewal found someone else holding it."""

    key: str
    token: str
    ttl_ms: int
    lost: bool = field(default=False)


class LeaseKeeper:
    """One daemon thread per process renewing every lease it holds at a third of the TTL."""

    def __init__(self) -> None:
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
            self._thread.start()

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._held[lease.key] = lease
            self._ensure_thread()

    def discard(self, lease: Lease) -> None:
        # By identity: a newer lease on the same key (the next singleton job, a retry) must
        # not be dropped because an older one was released or lost.
        with self._lock:
            if self._held.get(lease.key) is lease:
                del self._held[lease.key]

    def _loop(self) -> None:
        while True:
            interval = get_settings().lease_ttl / 3
            time.sleep(interval)
            with self._lock:
                leases = list(self._held.values())
            for lease in leases:
                try:
                    ok = get_redis().eval(_RENEW, 1, lease.key, lease.token, lease.ttl_ms)
                except redis.RedisError as exc:  # keep trying; the TTL gives us slack
                    log.warning("lease renewal failed for %s: %s", lease.key, exc)
                    continue
                if not ok:
                    lease.lost = True
                    self.discard(lease)
                    log.error("lease %s was lost (expired or taken over)", lease.key)


_keeper = LeaseKeeper()


def acquire(key: str, ttl: float | None = None, *, renew: bool = True) -> Lease | None:
    """Take the lease or return None if a live holder has it. Takes over a dead local holder's."""
    ttl_ms = int((ttl or get_settings().lease_ttl) * 1000)
    token = identity.new_token()
    client = get_redis()
    if not client.set(key, token, nx=True, px=ttl_ms):
        current = cast(str | None, client.get(key))
        if current is None:
            if not client.set(key, token, nx=True, px=ttl_ms):
                return None
        elif not (identity.holder_is_dead(current)
                  and client.eval(_STEAL, 1, key, current, token, ttl_ms)):
            return None
    lease = Lease(key, token, ttl_ms)
    if renew:
        _keeper.add(lease)
    return lease


def release(lease: Lease) -> bool:
    """Give the lease back if we still hold it; never deletes a successor's."""
    _keeper.discard(lease)
    try:
        return bool(get_redis().eval(_RELEASE, 1, lease.key, lease.token))
    except redis.RedisError as exc:
        log.warning("lease release failed for %s (it will expire): %s", lease.key, exc)
        return False


def remaining_ttl(key: str) -> float:
    """Seconds until the lease expires (0 when free)."""
    ms = get_redis().pttl(key)
    return max(0.0, ms / 1000) if ms and ms > 0 else 0.0


@contextlib.contextmanager
def held(key: str, ttl: float | None = None, *, renew: bool = True) -> Iterator[Lease | None]:
    """`with held(key) as lease:` lease is None when someone else holds it. With
    renew=False the lease lasts its TTL at most: a holder that hangs gives it up."""
    lease = acquire(key, ttl, renew=renew)
    try:
        yield lease
    finally:
        if lease is not None:
            release(lease)
