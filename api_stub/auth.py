"""Bearer-token auth for every router: `Depends(require("read"))` gives the Principal.

The token cache lives on the app (`app.state.token_cache`), so family routers in
api_stub/routes/ share it without importing create_app's closure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from workers.tokens import Principal, TokenCache

bearer = HTTPBearer(auto_error=False)
# At most this many token lookups hit the database at once: a flood of unknown tokens
# queues here instead of taking every connection of the pool.
_LOOKUPS = 4
# Marks the dependency `require` returns, so api_stub.contract can tell which routes answer
# 401/403 (and 503: the lookup reads the database) without a list to keep in step.
SCOPE_ATTR = "warden_scope"
_gate: asyncio.Semaphore | None = None


def _lookup_gate() -> asyncio.Semaphore:
    global _gate
    if _gate is None:
        _gate = asyncio.Semaphore(_LOOKUPS)
    return _gate


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: 401 without a valid token, 403 without `scope` (admin passes all)."""

    async def check(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
            raise HTTPException(401, "missing bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        cache: TokenCache = request.app.state.token_cache
        found, principal = cache.cached(creds.credentials)
        if not found:
            async with _lookup_gate():
                principal = await run_in_threadpool(cache.lookup, creds.credentials)
        if principal is None:
            raise HTTPException(401, "invalid or revoked token",
                                headers={"WWW-Authenticate": "Bearer"})
        if not principal.allows(scope):
            raise HTTPException(403, f"this token lacks the {scope!r} scope")
        return principal

    setattr(check, SCOPE_ATTR, scope)
    return check
