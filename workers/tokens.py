"""API bearer tokens: random, shown once, stored as SHA-256.

SHA-256 (not a slow KDF) is right here: the tokens are 256-bit random, so there is nothing to
brute-force, and the API checks one on every request.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

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


class TokenCache:
    """Scopes by token hash for `ttl` seconds, so auth is not a query on every request.
    The cost: a revoked token keeps working for up to `ttl` in each API process."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, frozenset[str] | None]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> tuple[bool, frozenset[str] | None]:
        """(found, scopes) from memory only: safe to call on the event loop."""
        hit = self._entries.get(hash_token(token))
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def scopes(self, token: str) -> frozenset[str] | None:
        """The token's scopes, or None for an unknown or revoked token (may query)."""
        found, scopes = self.cached(token)
        if found:
            return scopes
        digest = hash_token(token)
        now = time.monotonic()
        with session_scope() as s:
            row = s.execute(
                text("UPDATE api_tokens SET last_used_at=now() "
                     "WHERE token_hash=:h AND revoked_at IS NULL RETURNING scopes"),
                {"h": digest},
            ).first()
        scopes = frozenset(row.scopes) if row else None
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[digest] = (now + self.ttl, scopes)
        return scopes
