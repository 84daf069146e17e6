"""Maps domain errors to HTTP statuses; every error response carries an ``Error`` body."""

from __future__ import annotations

from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from diffq.app.contract import replication
from diffq.app.core.errors import (
    BatchNotFoundError,
    ContentCredentialsUnavailableError,
    DiffqError,
    IdempotencyConflictError,
    IdempotencyInProgressError,
    ImageNotFoundError,
    InvalidRequestError,
    JobFinishedError,
    JobListingDisabledError,
    JobNotFoundError,
    PollingTooFastError,
    QueueFullError,
    RateLimitedError,
    RequestTimeoutError,
    ServerBusyError,
    StoreBusyError,
    StoreFullError,
    StoreUnavailableError,
    TooManyQueuedJobsError,
    TooManyStreamsError,
    TooManyUploadsError,
    TooManyWaitsError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    UploadTooLargeError,
)
from diffq.app.schemas.errors import Error, FieldError

STATUS: dict[type[DiffqError], int] = {
    JobNotFoundError: 404,
    BatchNotFoundError: 404,
    ImageNotFoundError: 404,
    IdempotencyConflictError: 409,
    IdempotencyInProgressError: 409,
    InvalidRequestError: 422,  # UnknownModelError too, as a subclass
    StoreUnavailableError: 503,
    JobFinishedError: 409,
    UploadTooLargeError: 413,
    JobListingDisabledError: 403,
    UnauthorizedError: 401,
    RateLimitedError: 429,
    PollingTooFastError: 429,
    TooManyQueuedJobsError: 429,
    QueueFullError: 429,  # not 503: the service is up, other models take jobs, and proxies do not retry 429s
    TooManyStreamsError: 429,
    ContentCredentialsUnavailableError: 503,
    TooManyWaitsError: 429,
    TooManyUploadsError: 429,
    ServerBusyError: 503,
    RequestTimeoutError: 408,
    UnsupportedMediaTypeError: 415,
}

RETRY_AFTER_SECONDS = 1

#: Methods a 405's `Allow` header may list.
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "No valid API key (`Authorization: Bearer <key>`)."},
    404: {"model": Error, "description": "No such job or image."},
    413: {"model": Error, "description": "An uploaded image is larger than the deployment accepts."},
    422: {"model": Error, "description": "A field is invalid; `fields` names each one and what is accepted."},
    415: {"model": Error, "description": "The body is neither `application/json` nor `multipart/form-data`."},
    429: {
        "model": Error,
        "description": "Over the API key's request rate (`rate_limited`), queued-job cap "
        "(`too_many_queued_jobs`), open event streams (`too_many_streams`), open waits (`too_many_waits`) or "
        "uploads being decoded (`too_many_uploads`), or the model's queue is full (`queue_full`); retry after "
        "`Retry-After` seconds.",
    },
    503: {
        "model": Error,
        "description": "Redis is unreachable or failing over (`store_unavailable`), full "
        "(`redis_full`), too few replicas confirmed the job (`not_replicated`), or this API process is at its "
        "own limit (`store_busy`, `server_busy`); retry after `Retry-After` seconds (with the same "
        "`Idempotency-Key`: never a second job).",
    },
}


#: What every route behind an API key may answer besides its own (``diffq.app.main`` adds these to its routers).
KEYED_RESPONSES: dict[int | str, dict[str, Any]] = {code: ERROR_RESPONSES[code] for code in (401, 429, 503)}


def _status_for(exc: DiffqError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _error_response(status: int, error: Error, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.model_dump(), status_code=status, headers=headers)


async def _on_diffq_error(request: Request, exc: DiffqError) -> JSONResponse:
    fields = []
    if isinstance(exc, InvalidRequestError):
        fields = [FieldError(field=p.field, message=p.message) for p in exc.problems]
    status = _status_for(exc)
    retry = status == 503 or isinstance(exc, IdempotencyInProgressError)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if retry else None
    if exc.headers:
        headers = {**(headers or {}), **exc.headers}
    return _error_response(status, Error(code=exc.code, message=exc.message, fields=fields), headers)


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        if loc and loc[0] in ("body", "path", "query", "header"):
            loc = loc[1:]
        fields.append(FieldError(field=".".join(loc) or "body", message=str(error.get("msg", "invalid"))))
    message = "; ".join(f"{f.field}: {f.message}" for f in fields) or "invalid request"
    return _error_response(422, Error(code="invalid_request", message=message, fields=fields))


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405 and (allowed := _allowed_methods(request)):
        # Starlette's `Allow` names only the first route on the path (GET of `/v1/jobs/{id}`, not its DELETE).
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
    return _error_response(exc.status_code, Error(code=code, message=str(exc.detail)), headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route answers on the request's path (RFC 9110: `Allow` lists them all)."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


async def _on_redis_down(request: Request, exc: Exception) -> JSONResponse:
    return await _on_diffq_error(request, StoreUnavailableError(f"Redis is unreachable: {exc}"))


async def _on_pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
    """Every pooled connection is in use: Redis is fine, this process is at its limit; said as such."""
    return await _on_diffq_error(request, StoreBusyError())


async def _on_redis_full(request: Request, exc: Exception) -> JSONResponse:
    message = f"Redis is full and refuses writes ({exc}); nothing was stored, retry later"
    return await _on_diffq_error(request, StoreFullError(message))


async def _on_redis_read_only(request: Request, exc: Exception) -> JSONResponse:
    """A primary demoted to replica mid-failover (Sentinel clients reconnect on their own)."""
    return await _on_diffq_error(request, StoreUnavailableError(f"Redis is failing over: {exc}"))


async def _on_redis_refusal(request: Request, exc: Exception) -> JSONResponse:
    """A primary without enough replicas (``min-replicas-to-write``), or a replica cut off from
    its primary, refuses writes: a failover is under way. A full Redis refusing a write inside
    a script says OOM only in the message. Any other error is a bug: a 500."""
    if "OOM command not allowed" in str(exc):
        return await _on_redis_full(request, exc)
    if replication.is_failover_refusal(exc):
        return await _on_diffq_error(request, StoreUnavailableError(f"Redis is failing over: {exc}"))
    raise exc


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers so no route has to know about status codes of domain errors.
    (Starlette types a handler as taking any ``Exception``: hence the ignores; each is registered
    for its own class only.)"""
    app.add_exception_handler(DiffqError, _on_diffq_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(redis.exceptions.ConnectionError, _on_redis_down)
    app.add_exception_handler(redis.exceptions.MaxConnectionsError, _on_pool_exhausted)
    app.add_exception_handler(redis.exceptions.TimeoutError, _on_redis_down)
    app.add_exception_handler(redis.exceptions.OutOfMemoryError, _on_redis_full)
    app.add_exception_handler(redis.exceptions.ReadOnlyError, _on_redis_read_only)
    app.add_exception_handler(redis.exceptions.ResponseError, _on_redis_refusal)
