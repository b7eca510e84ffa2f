"""`warden validate` and `warden issues` as an operator uses them, with a real worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from domain import rules
from tests.conftest import Proc, Services, start_worker
from tests.integration.test_audit_helpers import (
    Isolated,
    add_character,
    constraints_off,
    isolated,
    warden,
)

pytestmark = pytest.mark.slow

CACHE_TTL = 1234  # WARDEN_VALIDATION_CACHE_TTL of this module's worker (default 3600)


@pytest.fixture(scope="module")
def iso(services: Services) -> Iterator[Isolated]:
    with isolated(services) as found:
        yield found


@pytest.fixture(scope="module")
def node(services: Services, iso: Isolated) -> Iterator[Proc]:
    proc = start_worker(services, "validate",
                        env=iso.overrides(WARDEN_VALIDATION_CACHE_TTL=str(CACHE_TTL)))
    yield proc
    proc.stop()


def test_validate_and_issues(iso: Isolated, node: Proc, rds: redis.Redis) -> None:
    conn: psycopg.Connection[Any]
    with iso.connect() as conn:
        # given one character with a broken attribute and one with an unknown age rule hit
        with constraints_off(conn):
            broken = add_character(conn, strength=14)
            aged = add_character(conn, age=700)
        add_character(conn)
    # when a full sweep runs: it found an error -> exit 1, and says what it did
    full = warden(iso, "validate", "--json")
    assert full.returncode == 1, full.stderr
    result = json.loads(full.stdout)
    assert (result["mode"], result["plan"]) == ("full", "inline")
    assert result["totals"]["issues"] == {"error": 1, "warning": 1}
    # an incremental sweep right after: every candidate cached, nothing found -> exit 0
    inc = warden(iso, "validate", "--incremental")
    assert inc.returncode == 0, inc.stderr
    assert "candidates=3 cache_hits=3 validated=0" in inc.stdout
    # the cached verdicts live WARDEN_VALIDATION_CACHE_TTL seconds, under the rules' version
    cached = list(rds.scan_iter(f"{iso.prefix}warden:validation:{rules.rules_version()}:*"))
    assert len(cached) == 3
    assert all(CACHE_TTL - 120 < rds.ttl(k) <= CACHE_TTL for k in cached)
    # named characters: only the warning one -> exit 0 (warnings are not errors)
    named = warden(iso, "validate", "--character", str(aged))
    assert named.returncode == 0 and "validated=1" in named.stdout
    # the issues, per character, with their lifecycle
    listed = json.loads(warden(iso, "issues", "--character", str(broken), "--json").stdout)
    assert [(i["rule"], i["severity"], i["resolved_at"]) for i in listed] == [
        ("strength_range", "error", None)]
    assert listed[0]["first_seen"] <= listed[0]["last_seen"]
    # bad input: one line, non-zero
    bad = warden(iso, "validate", "--character", "0")
    assert bad.returncode == 2
