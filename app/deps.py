"""Shared FastAPI dependencies as ``Annotated`` aliases; tests swap them with ``dependency_overrides``.

Dependencies that only build objects are ``async def``: FastAPI runs a plain ``def`` dependency in
its thread pool, a hop that costs more than the work. Those that wait on Redis stay ``def``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from redis import Redis
from starlette.datastructures import UploadFile

from app.auth.apikeys import KeyStore
from app.auth.caller import Caller
from app.contract.registry import Registry
from app.core.errors import FieldProblem, InvalidRequestError, RateLimitedError, UnauthorizedError, UploadTooLargeError
from app.core.idempotency import HEADER as IDEMPOTENCY_HEADER
from app.core.idempotency import fingerprint, fingerprint_multipart, validate_key
from app.core.jobs import JobService
from app.schemas.jobs import JobCreate, job_create_model
from app.settings import Settings


async def get_settings(request: Request) -> Settings:
    """The app's settings (given to ``create_app``); override this in tests to change limits."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_redis(request: Request) -> Redis:
    """The Redis client opened in the app's lifespan."""
    return request.app.state.redis


RedisDep = Annotated[Redis, Depends(get_redis)]


_bearer = HTTPBearer(auto_error=False, description="An API key made with `diffq keys create`.")


def get_caller(
    request: Request,
    response: Response,
    redis: RedisDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The request's API key, checked and counted against its rate; 401 or 429 otherwise.
    With ``DIFFQ_AUTH=off`` every request is the anonymous caller."""
    if settings.auth == "off":
        return Caller(None, settings)
    key = KeyStore(redis).verify(credentials.credentials if credentials is not None else None)
    if key is None:
        raise UnauthorizedError()
    caller = Caller(key, settings)
    decision = request.app.state.rate_limiter.hit(key.id, caller.rate_limit)
    if not decision.allowed:
        raise RateLimitedError(caller.rate_limit, decision.headers())
    response.headers.update(decision.headers())
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_job_service(redis: RedisDep, settings: SettingsDep, caller: CallerDep) -> JobService:
    return JobService(redis, settings, caller)


JobServiceDep = Annotated[JobService, Depends(get_job_service)]


async def get_registry(redis: RedisDep, settings: SettingsDep) -> Registry:
    return Registry(redis, settings.heartbeat_ttl)


RegistryDep = Annotated[Registry, Depends(get_registry)]


@dataclass(frozen=True)
class Submission:
    """A parsed ``POST /v1/jobs``: the fields, and multipart file parts by name."""

    body: JobCreate
    files: dict[str, bytes] = field(default_factory=dict)
    fingerprint: str | None = None  # of the body, when the request has an Idempotency-Key


#: Fields a multipart request may send as file parts.
FILE_FIELDS = ("image", "mask")


async def read_submission(request: Request, settings: SettingsDep) -> Submission:
    """Parse the POST body, JSON or multipart, with the limits of the current settings."""
    content_type = request.headers.get("content-type", "")
    keyed = validate_key(request.headers.get(IDEMPOTENCY_HEADER)) is not None
    if content_type.startswith("multipart/form-data"):
        values, files = await _read_multipart(request, settings)
        digest = fingerprint_multipart(values, files) if keyed else None
        return Submission(_validate(settings, values), files, digest)
    raw = await request.body()
    try:
        body = job_create_model(settings).model_validate_json(raw)
    except ValidationError as exc:
        raise _as_request_error(exc) from None
    return Submission(body, fingerprint=fingerprint(raw) if keyed else None)


async def _read_multipart(request: Request, settings: SettingsDep) -> tuple[dict[str, Any], dict[str, bytes]]:
    # A text field may carry a base64 image, so it may be as large as an upload in base64.
    form = await request.form(
        max_files=len(FILE_FIELDS), max_fields=64, max_part_size=settings.max_upload_bytes * 4 // 3 + 4096
    )
    values: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    problems = []
    for name, value in form.multi_items():
        if name in values or name in files:
            problems.append(FieldProblem(name, "is sent more than once"))
        elif isinstance(value, UploadFile):
            if name not in FILE_FIELDS:
                problems.append(FieldProblem(name, f"cannot be a file; file parts accepted: {', '.join(FILE_FIELDS)}"))
            elif value.size is not None and value.size > settings.max_upload_bytes:
                raise UploadTooLargeError(name, value.size, settings.max_upload_bytes)
            else:
                files[name] = await value.read()
        elif value != "" or name in ("prompt", "negative_prompt"):  # HTML forms send "" for empty inputs
            values[name] = value
    if isinstance(values.get("outpaint"), str):
        try:
            values["outpaint"] = json.loads(values["outpaint"])
        except json.JSONDecodeError:
            problems.append(FieldProblem("outpaint", 'must be a JSON object, e.g. {"left": 16, "right": 16}'))
    if isinstance(values.get("webhook"), str):
        try:
            values["webhook"] = json.loads(values["webhook"])
        except json.JSONDecodeError:
            problems.append(FieldProblem("webhook", 'must be a JSON object, e.g. {"url": "https://example.com/hook"}'))
    if isinstance(values.get("loras"), str):
        try:
            values["loras"] = json.loads(values["loras"])
        except json.JSONDecodeError:
            problems.append(FieldProblem("loras", 'must be a JSON list, e.g. [{"name": "stripes", "weight": 0.8}]'))
    await form.close()
    if problems:
        raise InvalidRequestError(problems)
    return values, files


def _validate(settings: Settings, values: dict[str, Any]) -> JobCreate:
    try:
        return job_create_model(settings).model_validate(values)
    except ValidationError as exc:
        raise _as_request_error(exc) from None


def _as_request_error(exc: ValidationError) -> RequestValidationError:
    errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
    return RequestValidationError(errors)


SubmissionBody = Annotated[Submission, Depends(read_submission)]
