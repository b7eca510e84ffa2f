"""API bearer tokens: random, shown once, stored as SHA-256.

SHA-256 (not a slow KDF) is right here: the tokens are 256-bit random, so there is nothing to
brute-force, and the API checks one on every request.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import text

from workers.db import session_scope
from workers.models import SCOPES

TOKEN_PREFIX = "wdn_"  # noqa: S105 - a prefix that makes leaked tokens greppable


class TokenError(ValueError):
    """Bad token request (unknown scope, duplicate name)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(raw: str | list[str]) -> list[str]:
    """'enqueue,read' -> ['enqueue', 'read'], rejecting unknown scopes."""
    items = raw.split(",") if isinstance(raw, str) else raw
    scopes = sorted({s.strip() for s in items if s.strip()})
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise TokenError(f"scopes must be a comma list of {', '.join(SCOPES)}; got {raw!r}")
    return scopes


def create_token(name: str, scopes: list[str]) -> str:
    """Store a new token's hash and return the clear token (the only time it exists)."""
    scopes = parse_scopes(scopes)
    if not name or len(name) > 100:
        raise TokenError("token name must be 1..100 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with session_scope() as s:
        taken = s.execute(text("SELECT 1 FROM api_tokens WHERE name=:n"), {"n": name}).first()
        if taken:
            raise TokenError(f"a token named {name!r} already exists")
        s.execute(
            text("INSERT INTO api_tokens (name, token_hash, scopes) VALUES (:n, :h, :s)"),
            {"n": name, "h": hash_token(token), "s": scopes},
        )
    return token


def token_is_valid(token: str) -> bool:
    """Whether the token exists and is not revoked (no cache)."""
    with session_scope() as s:
        row = s.execute(
            text("SELECT 1 FROM api_tokens WHERE token_hash=:h AND revoked_at IS NULL"),
            {"h": hash_token(token)},
        ).first()
    return row is not None


def revoke_token(name: str) -> bool:
    """Revoke by name; True if a live token was revoked."""
    with session_scope() as s:
        res = s.execute(
            text("UPDATE api_tokens SET revoked_at=now() WHERE name=:n AND revoked_at IS NULL"),
            {"n": name},
        )
    return bool(getattr(res, "rowcount", 0))


TOKEN_SHAPE = re.compile(r"^wdn_[A-Za-z0-9_-]{8,200}$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name (the operator log's "who") and its scopes."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class TokenCache:
    """Principals by token hash for `ttl` seconds, so auth is not a query on every request.
    The cost: a revoked token keeps working for up to `ttl` in each API process.

    An unknown token costs no write and, once seen, no query for a while (negative cache);
    a string that is not token-shaped never reaches the database at all, so a flood of bad
    tokens cannot exhaust the connection pool. Unknown tokens are kept apart from known
    ones, each side bounded by MAX_ENTRIES: a flood of token-shaped garbage fills and clears
    only its own side, never evicting the principals of real tokens (review N18).
    """

    NEGATIVE_SECONDS = 5.0
    LAST_USED_EVERY = 60.0  # last_used_at is a hint for operators, not an audit trail
    MAX_ENTRIES = 10_000

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._known: dict[str, tuple[float, Principal]] = {}
        self._unknown: dict[str, float] = {}  # digest -> until
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> tuple[bool, Principal | None]:
        """(found, principal) from memory only: safe to call on the event loop."""
        if not TOKEN_SHAPE.match(token):
            return True, None
        digest = hash_token(token)
        now = time.monotonic()
        hit = self._known.get(digest)
        if hit is not None and hit[0] > now:
            return True, hit[1]
        if self._unknown.get(digest, 0.0) > now:
            return True, None
        return False, None

    def lookup(self, token: str) -> Principal | None:
        """The token's principal, or None for an unknown or revoked token (may query)."""
        found, principal = self.cached(token)
        if found:
            return principal
        digest = hash_token(token)
        now = time.monotonic()
        with session_scope() as s:
            row = s.execute(
                text("SELECT name, scopes FROM api_tokens "
                     "WHERE token_hash=:h AND revoked_at IS NULL"),
                {"h": digest},
            ).first()
            if row is not None and self._touched.get(digest, 0.0) < now - self.LAST_USED_EVERY:
                s.execute(text("UPDATE api_tokens SET last_used_at=now() WHERE token_hash=:h"),
                          {"h": digest})
                self._touched[digest] = now
        principal = Principal(row.name, frozenset(row.scopes)) if row else None
        with self._lock:
            if principal is None:
                if len(self._unknown) >= self.MAX_ENTRIES:
                    self._unknown.clear()  # a flood: it forgets only its own kind
                self._unknown[digest] = now + max(self.ttl, self.NEGATIVE_SECONDS)
            else:
                if len(self._known) >= self.MAX_ENTRIES:  # as many live tokens: not a flood
                    self._known.clear()
                    self._touched.clear()
                self._known[digest] = (now + self.ttl, principal)
                self._unknown.pop(digest, None)
        return principal
