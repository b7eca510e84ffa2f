"""The API's token cache against a flood of unknown tokens (review N18): token-shaped strings
that match no token are remembered apart from real tokens, so they cannot push a real
token's principal out of the cache (every request would then query for it again)."""

from __future__ import annotations

import secrets
import uuid

from tests.conftest import Services
from workers.tokens import TOKEN_PREFIX, TokenCache, create_token


def test_a_flood_of_unknown_tokens_does_not_evict_a_known_one(services: Services) -> None:
    # given a cache (bounded small here: the bound is the class's, 10,000 by default) that
    # holds a real token's principal
    cache = TokenCache(ttl=300)
    cache.MAX_ENTRIES = 50
    name = f"t-cache-{uuid.uuid4().hex[:6]}"
    token = create_token(name, ["read"])
    assert cache.lookup(token) is not None
    # when more unknown token-shaped strings than the bound are tried
    unknown = [TOKEN_PREFIX + secrets.token_urlsafe(32) for _ in range(3 * cache.MAX_ENTRIES)]
    for bogus in unknown:
        assert cache.lookup(bogus) is None
    # then the real token is still answered from memory, without a query
    found, principal = cache.cached(token)
    assert found and principal is not None and principal.name == name
    # and the newest unknown ones are remembered as unknown (no query for them either)
    assert cache.cached(unknown[-1]) == (True, None)
