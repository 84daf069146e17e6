"""The OpenAPI document, with ``JobCreate`` carrying this deployment's limits."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.schemas.jobs import job_create_model
from app.settings import Settings

JOB_CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobCreate"}}},
    }
}
"""``openapi_extra`` of ``POST /v1/jobs``, whose body is parsed by a dependency."""


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """Generate once, then serve the cached document."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["JobCreate"] = job_create_model(settings).model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        app.openapi_schema = schema
    return app.openapi_schema
