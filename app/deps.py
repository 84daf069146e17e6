"""Shared FastAPI dependencies as ``Annotated`` aliases; tests swap them with ``dependency_overrides``.

Dependencies that only build objects are ``async def``: FastAPI runs a plain ``def`` dependency in
its thread pool, a hop that costs more than the work. So is the API key check, which waits on Redis
through the asyncio client (``diffq.app.api.redis_clients``); others that wait on Redis stay ``def``."""

from __future__ import annotations

import binascii
import json
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from limits import RateLimitItem
from pydantic import ValidationError
from redis import Redis
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffq.app.api.waiting import Waiter
from diffq.app.auth.apikeys import VerifiedKeys, verify_async
from diffq.app.auth.caller import Caller
from diffq.app.auth.quotas import RateDecision, RateLimiter, decision
from diffq.app.contract.keys import api_key
from diffq.app.contract.registry import Registry
from diffq.app.core.errors import (
    FieldProblem,
    InvalidRequestError,
    RateLimitedError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    UploadTooLargeError,
)
from diffq.app.core.idempotency import HEADER as IDEMPOTENCY_HEADER
from diffq.app.core.idempotency import fingerprint, fingerprint_multipart, validate_key
from diffq.app.core.jobs import CountedRate, JobService
from diffq.app.schemas.jobs import JobCreate, job_create_model
from diffq.app.settings import Settings
from diffq.app.storage.base import ResultStore

F = TypeVar("F", bound=Callable[..., Any])


async def get_settings(request: Request) -> Settings:
    """The app's settings (given to ``create_app``); override this in tests to change limits."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_redis(request: Request) -> Redis:
    """The Redis client opened in the app's lifespan."""
    return request.app.state.redis


RedisDep = Annotated[Redis, Depends(get_redis)]


def presented_key(authorization: str | None) -> str | None:
    """The API key a request presents in its ``Authorization`` header: a Bearer token, or inside HTTP
    Basic credentials (AUTOMATIC1111 clients: any user name and the key as the password, or the key as
    the user name and an empty password). Read here rather than through FastAPI's ``HTTPBearer`` and
    ``HTTPBasic`` dependencies, with their rules: two dependencies on every ``/v1`` request cost more
    than the parse (``diffq.app.api.openapi`` still lists the scheme). Malformed Basic credentials
    (SillyTavern sends ``Basic `` with none when none are set) count as none, so they are refused like
    a missing key only while auth is on."""
    if not authorization:
        return None
    scheme, _, param = authorization.partition(" ")
    scheme, param = scheme.lower(), param.strip()
    if scheme == "bearer":
        return param or None
    if scheme != "basic":
        return None
    try:
        data = b64decode(param).decode("ascii")
    except (ValueError, UnicodeDecodeError, binascii.Error):
        return None
    username, separator, password = data.partition(":")
    return (password or username) if separator else None


async def get_caller(request: Request, response: Response, settings: SettingsDep) -> Caller:
    """The request's API key (Bearer, or HTTP Basic as AUTOMATIC1111 clients send it), checked and
    counted against its rate; 401 or 429 otherwise. With ``DIFFQ_AUTH=off`` every request is the
    anonymous caller. On the event loop, through the asyncio client: a known key costs one round trip
    (its rate, which also says it is not revoked), no thread. On a route marked ``rate_in_submit``
    (a JSON ``POST /v1/jobs`` without an Idempotency-Key), the rate is counted by the submit script
    itself, in the job's one round trip, or by ``settle_rate`` if the request ends before it."""
    if settings.auth == "off":
        return Caller(None, settings)
    state = request.app.state
    token = presented_key(request.headers.get("authorization")) or ""
    verified: VerifiedKeys = state.verified_keys
    key = verified.get(token) if token else None
    if key is None:
        key = await verify_async(state.quick, token or None)
        if key is None:
            raise UnauthorizedError()
        verified.put(token, key)
    caller = Caller(key, settings)
    limiter: RateLimiter = state.rate_limiter
    if _rate_deferred(request):
        item, arguments = limiter.arguments(key.id, caller.rate_limit)
        counted = CountedRate(api_key(key.id), arguments)
        request.state.rate_due = RateDue(token, key.id, caller.rate_limit, item, counted)
        return caller
    _apply_rate(request, token, caller.rate_limit, await limiter.hit_async(key.id, caller.rate_limit), response)
    return caller


@dataclass
class RateDue:
    """A request's rate hit left to the submit script (``get_caller``)."""

    token: str
    key_id: str
    rate: str
    item: RateLimitItem
    counted: CountedRate


#: Endpoints whose submit script counts the request's rate (``rate_in_submit``).
_RATE_IN_SUBMIT: set[Callable[..., Any]] = set()


def rate_in_submit(endpoint: F) -> F:
    """Mark a route whose JSON requests without an Idempotency-Key have their rate counted by the submit
    script (``RateDue``), which then must ``settle_rate`` on every way out."""
    _RATE_IN_SUBMIT.add(endpoint)
    return endpoint


def _rate_deferred(request: Request) -> bool:
    return (
        request.scope.get("endpoint") in _RATE_IN_SUBMIT
        and media_type(request.headers.get("content-type")) == "application/json"
        and IDEMPOTENCY_HEADER not in request.headers
    )


def rate_due(request: Request) -> CountedRate | None:
    """The rate hit the submit script should make for this request, if ``get_caller`` left it one."""
    due: RateDue | None = getattr(request.state, "rate_due", None)
    return due.counted if due is not None else None


async def settle_rate(request: Request, response: Response | None = None) -> None:
    """Answer a request's rate hit left to the submit script (``rate_due``): from the script's reply if it
    ran, else counted now, as ``get_caller`` would have; 401 (revoked) or 429 (over the rate) then
    override whatever else the request met. A no-op without one, or once settled."""
    due: RateDue | None = getattr(request.state, "rate_due", None)
    if due is None:
        return
    request.state.rate_due = None
    reply = due.counted.reply
    limiter: RateLimiter = request.app.state.rate_limiter
    found = decision(due.item, reply) if reply is not None else await limiter.hit_async(due.key_id, due.rate)
    _apply_rate(request, due.token, due.rate, found, response)


def _apply_rate(request: Request, token: str, rate: str, found: RateDecision | None, response: Response | None) -> None:
    if found is None:  # revoked (or removed) since this process verified it
        request.app.state.verified_keys.drop(token)
        raise UnauthorizedError()
    if not found.allowed:
        raise RateLimitedError(rate, found.headers())
    if response is not None:
        response.headers.update(found.headers())


CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_results(request: Request) -> ResultStore:
    """The result store opened (and checked) in the app's lifespan."""
    return request.app.state.results


ResultsDep = Annotated[ResultStore, Depends(get_results)]


async def get_waiter(request: Request) -> Waiter:
    """The process's ``Waiter`` (``diffq.app.api.waiting``), built in the app's lifespan: long polls, event
    streams and the synchronous endpoints all wait through it."""
    return request.app.state.waiter


WaiterDep = Annotated[Waiter, Depends(get_waiter)]


async def get_job_service(request: Request, caller: CallerDep) -> JobService:
    # The app's clients read straight from its state, and the settings from the caller (get_caller's
    # SettingsDep): every sub-dependency costs FastAPI's resolution on every request, cached or not
    # (measured: a fifth of POST /v1/jobs' CPU went to resolving).
    state = request.app.state
    return JobService(state.redis, caller.settings, caller, state.results, quick=state.quick)


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


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, lower-case, without parameters ("" if none)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


async def read_submission(request: Request, settings: SettingsDep) -> Submission:
    """``parse_submission``; a request refused here is counted against its key's rate all the same
    (``settle_rate``), and answered 429 rather than 4xx if it is over the rate, as it would be had the
    rate been counted first."""
    try:
        return await parse_submission(request, settings)
    except Exception:
        await settle_rate(request)
        raise


async def parse_submission(request: Request, settings: Settings) -> Submission:
    """Parse the POST body, JSON or multipart, with the limits of the current settings; any other
    media type is a 415 (a browser form posting ``text/plain`` across sites is not a job).

    JSON is validated strictly (``"steps": true`` or ``"metadata": "no"`` are refused, as the
    OpenAI-compatible route refuses them); multipart form fields are text by nature and are
    read as such."""
    content_type = request.headers.get("content-type")
    kind = media_type(content_type)
    if kind not in ("application/json", "multipart/form-data"):
        raise UnsupportedMediaTypeError(content_type)
    keyed = validate_key(request.headers.get(IDEMPOTENCY_HEADER)) is not None
    if kind == "multipart/form-data":
        values, files = await _read_multipart(request, settings)
        digest = fingerprint_multipart(values, files) if keyed else None
        return Submission(_validate(settings, values), files, digest)
    raw = await request.body()
    try:
        body = job_create_model(settings).model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise _as_request_error(exc) from None
    return Submission(body, fingerprint=fingerprint(raw) if keyed else None)


async def read_form(request: Request, *, max_files: int, max_fields: int, max_part_size: int) -> FormData:
    """The multipart form; a malformed one (or one over the counts) is a 422 naming the body, where Starlette
    would answer a bare 400."""
    try:
        return await request.form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size)
    except StarletteHTTPException as error:
        if error.status_code != 400:
            raise
        raise InvalidRequestError([FieldProblem("body", f"is not valid multipart/form-data: {error.detail}")]) from None


async def _read_multipart(request: Request, settings: SettingsDep) -> tuple[dict[str, Any], dict[str, bytes]]:
    # A text field may carry a base64 image, so it may be as large as an upload in base64.
    form = await read_form(
        request, max_files=len(FILE_FIELDS), max_fields=64, max_part_size=settings.max_upload_bytes * 4 // 3 + 4096
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
