"""The OpenAPI document as an exact contract (docs/adr/0008-exact-openapi-contract.md).

FastAPI documents what a route's signature says; the statuses that come from elsewhere (auth
dependency, body-size middleware, database-down handler) and the job-type union it cannot
see. `openapi(app)` adds them once for every route, family routers included, from what each
route has: a token dependency (401, 403, 503), path parameters (404), a body (413, 422), any
parameter (422). A route adds what only it knows (409) with `responses={409: {...}}`, no
model needed: every error status gets its body model here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, routing
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema

from api_stub.auth import SCOPE_ATTR
from api_stub.middleware import MAX_BODY
from api_stub.schemas import NO_NUL, ErrorOut, ValidationErrorOut

REF = "#/components/schemas/"
JOB_IN = "JobIn"
# A JSON object key standing for an int, as the API writes it (and so as it reads it).
INT_KEY = r"^(0|-?[1-9][0-9]*)$"
_INT = TypeAdapter(int)

# What each status means on any route; a route's own description (from its decorator) wins.
DESCRIPTIONS = {
    401: "missing, invalid or revoked bearer token",
    403: "the token lacks the scope this route needs",
    404: "no such resource",
    409: "conflicts with the resource's current state",
    413: f"request body over {MAX_BODY // 1024} KiB",
    422: "validation error: `loc` names the field",
    503: "the database is unavailable: come back after Retry-After seconds",
}
HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds", "schema": {"type": "string"}}},
}


def install(app: FastAPI) -> None:
    """Serve `openapi(app)` as /openapi.json (built once, at the first request)."""

    def cached() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi(app)
        return app.openapi_schema

    app.openapi = cached  # type: ignore[method-assign]


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus every status each route can return, with its body model,
    and the job request as a union discriminated by `type`."""
    doc = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                      description=app.description, routes=app.routes, tags=app.openapi_tags,
                      servers=app.servers)
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    _merge(schemas, _model_schemas([ErrorOut, ValidationErrorOut]))
    for route in api_routes(app):
        if not route.include_in_schema:
            continue
        for method in route.methods or ():
            operation = doc["paths"][route.path_format][method.lower()]
            for status in sorted(error_statuses(route)):
                _document_error(operation["responses"], status)
    _job_union(schemas)
    _forbid_nul(doc)
    for unused in ("HTTPValidationError", "ValidationError"):
        if not _referenced(doc, unused):
            schemas.pop(unused, None)
    return doc


def links(statuses: tuple[int, ...], **targets: tuple[str, str, dict[str, str]]
          ) -> dict[str, Any]:
    """`openapi_extra` for a route whose response leads to other operations: each target is
    (method, path, {parameter: runtime expression}). Clients and schemathesis's stateful
    phase follow them, e.g. from a created job to its cancel."""
    found = {name: {"operationRef": "#/paths/" + path.replace("~", "~0").replace("/", "~1")
                    + "/" + method.lower(), "parameters": params}
             for name, (method, path, params) in targets.items()}
    return {"responses": {str(status): {"links": found} for status in statuses}}


def api_routes(app: FastAPI) -> list[Any]:
    """Every API route as served, family routers included. FastAPI 0.165 keeps an included
    router as one entry of app.routes; its route contexts carry the served path and the
    original route's dependant, body and responses."""
    if hasattr(routing, "iter_route_contexts"):
        return [ctx for ctx in routing.iter_route_contexts(app.routes)
                if isinstance(ctx.original_route, APIRoute)]
    return [r for r in app.routes if isinstance(r, APIRoute)]


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods of every route serving `path` (for a 405's Allow header). Starlette names
    only the first route that matched the path, so GET and POST of one path, declared as two
    routes, would advertise just one of them."""
    contexts: list[Any] = (list(routing.iter_route_contexts(app.routes))
                           if hasattr(routing, "iter_route_contexts") else list(app.routes))
    found: set[str] = set()
    for route in contexts:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            found |= set(getattr(route, "methods", None) or ())
    return sorted(found)


def error_statuses(route: Any) -> set[int]:
    """The error statuses a route can return, from what it has, plus those it declares."""
    found = {int(s) for s in route.responses if str(s).isdigit() and int(s) >= 400}
    if any(getattr(d.call, SCOPE_ATTR, None) for d in _dependencies(route.dependant)):
        found |= {401, 403, 503}  # the token lookup reads the database
    if route.dependant.path_params:
        found.add(404)
    if route.body_field is not None:
        found |= {413, 422}
    if route.dependant.query_params or route.dependant.header_params or route.dependant.path_params:
        found.add(422)
    return found


def _dependencies(dependant: Dependant) -> Iterator[Dependant]:
    for dep in dependant.dependencies:
        yield dep
        yield from _dependencies(dep)


def _document_error(responses: dict[str, Any], status: int) -> None:
    """The status with its body model, unless the route already gave it a body."""
    entry = responses.setdefault(str(status), {})
    if not entry.get("description") or entry["description"] == "Validation Error":
        entry["description"] = DESCRIPTIONS.get(status, "error")
    content = entry.get("content", {}).get("application/json", {})
    if "$ref" in content.get("schema", {}) and not content["schema"]["$ref"].endswith(
            "/HTTPValidationError"):
        return  # a body model of the route's own (GET /readyz's 503)
    model = ValidationErrorOut if status == 422 else ErrorOut
    entry["content"] = {"application/json": {"schema": {"$ref": REF + model.__name__}}}
    if status in HEADERS:
        entry["headers"] = HEADERS[status]


def _job_union(schemas: dict[str, Any]) -> None:
    """Replace JobIn (type: str, params: object) with one member per registered job type:
    `{type: const, params: <its params model>}`, discriminated by `type`. Validation stays
    in workers.enqueue.prepare; this only tells clients what it accepts."""
    from workers.enqueue import job_types

    plain = schemas.get(JOB_IN)
    if plain is None:
        return
    types = job_types()
    models = sorted({task.params for task in types.values()}, key=lambda m: m.__qualname__)
    refs = _merge(schemas, _model_schemas(models))
    members, mapping = [], {}
    for name, task in sorted(types.items()):
        member = job_schema_name(name)
        params_ref = refs[task.params]
        params = schemas[params_ref.removeprefix(REF)]
        doc = (task.__doc__ or task.run.__doc__ or "").strip().split("\n\n")[0]
        _put(schemas, member, {
            "title": member, "description": doc, "type": "object",
            "properties": {
                "type": {"type": "string", "const": name, "title": "Type"},
                "params": {"$ref": params_ref},
                "idempotency_key": plain["properties"]["idempotency_key"],
                "countdown": plain["properties"]["countdown"],
            },
            # params may be left out when every field of the model has a default
            "required": ["type", "params"] if params.get("required") else ["type"],
            "additionalProperties": False,
        })
        members.append({"$ref": REF + member})
        mapping[name] = REF + member
    schemas[JOB_IN] = {
        "title": JOB_IN, "description": "POST /v1/jobs: a job type and its params.",
        "oneOf": members, "discriminator": {"propertyName": "type", "mapping": mapping},
    }


def job_schema_name(job_type: str) -> str:
    """`xp.approve_spend` -> `XpApproveSpendJob`: a class name for generated clients."""
    return "".join(p[:1].upper() + p[1:] for p in re.split(r"[._]", job_type)) + "Job"


def check_params(model: type[BaseModel], params: dict[str, Any]) -> list[dict[str, Any]]:
    """Field errors (loc from the params) for what the document forbids but the model's
    lax validation would take: a numeric string for an int, 0 for a bool, an int-keyed
    object's key written otherwise than INT_KEY (" 1", "+1", "01"). Validating as JSON in
    strict mode is JSON Schema's reading of the same model; workers.enqueue.prepare still
    does the validation every producer gets."""
    try:
        parsed = model.model_validate_json(json.dumps(_whole_numbers(params)), strict=True)
    except ValidationError as exc:
        return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_context=False,
                                    include_input=False)]
    loc = _rewritten_key(params, parsed.model_dump(mode="json", exclude_unset=True), [])
    if loc is not None:
        return [{"loc": loc, "msg": "an integer key is written in decimal, as 12 or -3",
                 "type": "value_error"}]
    return []


def _whole_numbers(value: Any) -> Any:
    """5.0 as 5: JSON Schema's integer is a number with no fraction, however written."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    return value


def _int_text(key: str) -> str | None:
    """The int a lax int parse would read in the key, written in decimal."""
    try:
        return str(_INT.validate_python(key))
    except ValidationError:
        return None


def _rewritten_key(given: Any, canonical: Any, loc: list[str | int]) -> list[str | int] | None:
    """Where a key of `given` did not survive validation as written (parsed to another)."""
    if isinstance(given, dict) and isinstance(canonical, dict):
        for key, value in given.items():
            if key not in canonical:
                if _int_text(key) in canonical:
                    return [*loc, key]  # " 1" read as 1, written back as "1"
                continue  # a field the model ignores (extra="ignore")
            found = _rewritten_key(value, canonical[key], [*loc, key])
            if found is not None:
                return found
    elif isinstance(given, list) and isinstance(canonical, list):
        for i, (a, b) in enumerate(zip(given, canonical, strict=False)):
            found = _rewritten_key(a, b, [*loc, i])
            if found is not None:
                return found
    return None


class _ExactSchema(GenerateJsonSchema):
    """pydantic's JSON Schema plus what it leaves out: the keys of a dict[int, ...]."""

    def dict_schema(self, schema: core_schema.DictSchema) -> JsonSchemaValue:
        out = super().dict_schema(schema)
        if schema.get("keys_schema", {}).get("type") == "int":
            out["propertyNames"] = {"pattern": INT_KEY}
        return out


def _model_schemas(models: list[type[BaseModel]]) -> tuple[dict[Any, str], dict[str, Any]]:
    refs, top = models_json_schema([(m, "validation") for m in models],
                                   ref_template=REF + "{model}", schema_generator=_ExactSchema)
    return {m: refs[(m, "validation")]["$ref"] for m in models}, top.get("$defs", {})


def _merge(schemas: dict[str, Any],
           found: tuple[dict[Any, str], dict[str, Any]]) -> dict[Any, str]:
    refs, defs = found
    for name, schema in defs.items():
        _put(schemas, name, schema)
    return refs


def _put(schemas: dict[str, Any], name: str, schema: dict[str, Any]) -> None:
    if name in schemas and schemas[name] != schema:
        # Two models with one name: a client would get one class for both. Rename one.
        raise RuntimeError(f"OpenAPI component {name!r} defined twice, differently")
    schemas[name] = schema


def _forbid_nul(doc: dict[str, Any]) -> None:
    """Every free-form string a request carries says it takes no U+0000 (PostgreSQL cannot
    store it, and the API answers 422); strings with a pattern or enum say what they take."""
    targets: list[Any] = []
    for path in doc["paths"].values():
        for operation in path.values():
            targets += [p.get("schema", {}) for p in operation.get("parameters", [])
                        if p.get("in") != "path"]
            for media in operation.get("requestBody", {}).get("content", {}).values():
                targets.append(media.get("schema", {}))
    schemas = doc["components"]["schemas"]
    seen: set[str] = set()
    while targets:
        node = targets.pop()
        if isinstance(node, list):
            targets += node
        elif isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(REF) and ref not in seen:
                seen.add(ref)
                targets.append(schemas.get(ref.removeprefix(REF)))
            if (node.get("type") == "string" and not {"pattern", "enum", "const", "format"}
                    & node.keys()):
                node["pattern"] = NO_NUL
            targets += [v for k, v in node.items() if k not in ("examples", "default")]


def _referenced(doc: dict[str, Any], name: str) -> bool:
    """Whether anything but the component itself refers to it."""
    others = {k: v for k, v in doc["components"]["schemas"].items() if k != name}
    return f'"{REF}{name}"' in json.dumps([doc["paths"], others])
