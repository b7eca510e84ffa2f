"""Schemathesis hooks for tests/integration/test_openapi.py (loaded through SCHEMATHESIS_HOOKS).

One hook, for the one rule of the API that OpenAPI cannot state (docs/adr/0008): POST /v1/jobs
takes an idempotency key in the `Idempotency-Key` header or in the body, and when both are
sent they must be equal (422 otherwise: tests/integration/test_api.py shows it). A document
cannot tie a header to a body field, so a positive (schema-valid) case gets the header set to
the body's key; every other case, negative ones included, goes out as generated.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """Make a positive job request's two idempotency keys agree."""
    meta = case.meta
    if (case.operation.method.upper() != "POST" or case.operation.path != "/v1/jobs"
            or meta is None or not meta.generation.mode.is_positive
            or not isinstance(case.body, dict) or not case.headers):
        return case
    body_key = case.body.get("idempotency_key")
    for name in list(case.headers):
        if name.lower() == "idempotency-key" and body_key is not None:
            case.headers[name] = body_key
    return case
