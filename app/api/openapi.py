"""The OpenAPI document, with ``JobCreate`` carrying this deployment's limits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, routing
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi

from diffq.app.schemas.batches import BatchCreate
from diffq.app.schemas.jobs import job_create_model
from diffq.app.settings import Settings

JOB_CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}},
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/JobCreateMultipart"}},
        },
    }
}
"""``openapi_extra`` of ``POST /v1/jobs``, whose body is parsed by a dependency."""

BATCH_CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/BatchCreate"}},
            "application/jsonl": {"schema": {"type": "string", "description": "One job object per line."}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL of jobs; with prompt_template, a CSV (or JSON list) of rows.",
                        },
                        "prompt_template": {"type": "string"},
                        "defaults": {"type": "string", "description": "JSON object of job fields."},
                        "webhook": {"type": "string", "description": "JSON object: url, item_events."},
                        "priority": {"type": "string", "enum": ["high", "normal", "low"]},
                        "metadata": {"type": "string", "description": "JSON object of strings."},
                    },
                    "required": ["file"],
                    "additionalProperties": {
                        "type": "string",
                        "format": "binary",
                        "description": "A shared input image, used by items as input:<name>.",
                    },
                }
            },
        },
    }
}
"""``openapi_extra`` of ``POST /v1/batches``, whose body the route reads in any of its forms."""


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """Generate once, then serve the cached document."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        job_create = job_create_model(settings).model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in job_create.pop("$defs", {}).items():  # nested models (Outpaint, JobMode)
            schemas.setdefault(name, definition)
        schemas["JobCreate"] = job_create
        schemas["JobCreateMultipart"] = _multipart_schema(schemas["JobCreate"])
        batch_create = BatchCreate.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in batch_create.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas["BatchCreate"] = batch_create
        _errors_as_json(schema)
        _api_key_security(schema, app)
        app.openapi_schema = schema
    return app.openapi_schema


#: The scheme every ``/v1`` operation lists: ``diffq.app.deps.get_caller`` reads the key itself (HTTP Basic too).
API_KEY_SCHEME = {"type": "http", "scheme": "bearer", "description": "An API key made with `diffq keys create`."}


def _api_key_security(schema: dict[str, Any], app: FastAPI) -> None:
    """The API key as the security scheme of every operation that checks one (``get_caller``): written
    here because the check parses the header itself rather than through a FastAPI security dependency."""
    from diffq.app.deps import get_caller  # deps imports this module's neighbours; import at use

    keyed = [
        context
        for context in routing.iter_route_contexts(app.routes)
        if getattr(context, "include_in_schema", False)
        and getattr(context, "dependant", None) is not None
        and _depends_on(context.dependant, get_caller)
    ]
    if not keyed:
        return
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["HTTPBearer"] = API_KEY_SCHEME
    paths = schema.get("paths", {})
    for context in keyed:
        for method in context.methods or ():
            operation = paths.get(context.path_format, {}).get(method.lower())
            if operation is not None:
                operation["security"] = [{"HTTPBearer": []}]


def _depends_on(dependant: Dependant, call: Callable[..., Any]) -> bool:
    return any(sub.call is call or _depends_on(sub, call) for sub in dependant.dependencies)


def _errors_as_json(schema: dict[str, Any]) -> None:
    """Error bodies are JSON whatever the route streams: FastAPI files a route's error ``responses``
    under its own media type (``text/event-stream`` for ``/events``), so move them to JSON."""
    for operation in (op for path in schema.get("paths", {}).values() for op in path.values()):
        for status, response in operation.get("responses", {}).items():
            content = response.get("content")
            if status[:1] in ("4", "5") and content and len(content) == 1 and "application/json" not in content:
                response["content"] = {"application/json": content.popitem()[1]}


def _multipart_schema(job_create: dict[str, Any]) -> dict[str, Any]:
    """The same fields as form fields, with `image` and `mask` also accepted as file parts."""
    properties = dict(job_create.get("properties", {}))
    for name in ("image", "mask"):
        text = properties[name]
        properties[name] = {
            "description": text.get("description", ""),
            "anyOf": [{"type": "string", "format": "binary"}, {"type": "string"}],
        }
    properties["outpaint"] = {
        "type": "string",
        "description": 'Pixels to add per side, as a JSON object, e.g. {"left": 16, "right": 16}.',
    }
    properties["webhook"] = {
        "type": "string",
        "description": 'The webhook as a JSON object, e.g. {"url": "https://example.com/hook", '
        '"events": ["succeeded"]}.',
    }
    properties["loras"] = {
        "type": "string",
        "description": 'LoRA adapters as a JSON list, e.g. [{"name": "stripes", "weight": 0.8}].',
    }
    return {
        "type": "object",
        "title": "JobCreateMultipart",
        "properties": properties,
        "required": job_create.get("required", []),
    }
