"""Leases in real Redis: exclusive, renewed, released only by their holder."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

from workers import leases
from workers.settings import get_settings


def test_lease_is_exclusive_and_release_is_safe(services: object) -> None:
    key = f"test:lease:{uuid.uuid4()}"
    first = leases.acquire(key, ttl=5)
    assert first is not None
    assert leases.acquire(key, ttl=5) is None  # held by a live holder (this process)
    # a holder whose lease expired must not delete its successor's
    stale = leases.Lease(key, "someone-else:1:x", 5000)
    assert leases.release(stale) is False
    assert leases.release(first) is True
    again = leases.acquire(key, ttl=5)
    assert again is not None
    leases.release(again)


def test_lease_outlives_its_ttl_while_renewed(services: object) -> None:
    key = f"test:lease:{uuid.uuid4()}"
    ttl = get_settings().lease_ttl  # 3 s in tests; renewed every 1 s
    lease = leases.acquire(key, ttl=ttl)
    assert lease is not None
    time.sleep(ttl * 1.7)
    assert leases.acquire(key) is None
    assert not lease.lost
    leases.release(lease)


def test_dead_local_holder_is_taken_over_at_once(services: object) -> None:
    # given a lease taken by a process that then died without releasing it
    key = f"test:lease:{uuid.uuid4()}"
    code = (f"from workers import leases; l = leases.acquire({key!r}, ttl=60, renew=False); "
            "print(l.token)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip()
    # when another process asks for it; then it gets it without waiting 60 s
    taken = leases.acquire(key, ttl=5)
    assert taken is not None
    leases.release(taken)
