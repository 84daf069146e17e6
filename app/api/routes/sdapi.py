"""``/sdapi/v1/txt2img`` and ``img2img``: AUTOMATIC1111's generation calls, as its clients (webuiapi,
Open WebUI, SillyTavern, bots) send them. The rest of ``/sdapi/v1`` is ``sdapi_session``.

``txt2img`` and ``img2img`` queue an ordinary diffq job (same queue, limits, fair share, idempotency
and timeouts as ``POST /v1/jobs``; the mapping is ``diffq.app.core.a1111``), wait for it up to
``DIFFQ_SDAPI_TIMEOUT`` seconds and answer A1111's ``{"images", "parameters", "info"}``. Options and
jobs are per API key (``diffq.app.core.a1111_session``): ``sd_model_checkpoint`` is that key's default
model, and ``progress``/``interrupt``/``skip`` see only that key's ``/sdapi/v1`` jobs.

Errors have A1111's body (``diffq.app.api.a1111_errors``), ``{"error", "detail", "body", "errors"}``:
``422`` for a request that cannot map (``detail`` names the field and what is accepted), ``500`` for a
failed job, ``503`` when no worker is live or Redis is down, ``504`` when the job outlasts the wait (it goes
on; ``detail`` names its URL). A job ended by ``interrupt`` answers ``200`` with no images, as A1111
does. The job's id is in the ``x-diffq-job-id`` header and in ``info``. Auth: HTTP Basic (the API key as
the password) or Bearer, as on every ``/v1`` route.
"""

from __future__ import annotations

import base64
import logging
from contextlib import AsyncExitStack
from typing import Annotated, Any

import redis.exceptions
from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from diffq.app import __version__
from diffq.app.api.a1111_errors import ERRORS, A1111Failure, failure, invalid, json_object, problem
from diffq.app.api.public_urls import public_url
from diffq.app.api.waiting import Waiter, WaitTimedOut
from diffq.app.contract.status import JobStatus
from diffq.app.core import a1111
from diffq.app.core.a1111_session import A1111Session
from diffq.app.core.errors import DiffqError, JobNotFoundError
from diffq.app.core.idempotency import HEADER as IDEMPOTENCY_HEADER
from diffq.app.core.idempotency import fingerprint, validate_key
from diffq.app.core.jobs import JobService, JobView
from diffq.app.core.uploads import UploadLimits
from diffq.app.deps import JobServiceDep, RedisDep, WaiterDep
from diffq.app.schemas.a1111 import GenerationAnswer
from diffq.app.schemas.jobs import job_create_model

log = logging.getLogger(__name__)

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])

REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": a1111.A1111Request.model_json_schema()}},
    }
}


def session_of(redis: Any, jobs: JobService) -> A1111Session:
    """The caller's A1111 options and jobs."""
    return A1111Session(redis, jobs.caller.scope, jobs.settings.job_ttl)


@router.post(
    "/txt2img",
    openapi_extra=REQUEST_BODY,
    response_model=GenerationAnswer,
    responses=ERRORS,
    summary="A1111 txt2img: queue a job, wait, answer base64 PNGs",
)
async def txt2img(
    request: Request,
    jobs: JobServiceDep,
    redis: RedisDep,
    waiter: WaiterDep,
    idempotency_key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER)] = None,
) -> Any:
    return await _guarded(_generate(request, jobs, waiter, session_of(redis, jobs), False, idempotency_key))


@router.post(
    "/img2img",
    openapi_extra=REQUEST_BODY,
    response_model=GenerationAnswer,
    responses=ERRORS,
    summary="A1111 img2img (inpainting with `mask`): queue a job, wait, answer base64 PNGs",
)
async def img2img(
    request: Request,
    jobs: JobServiceDep,
    redis: RedisDep,
    waiter: WaiterDep,
    idempotency_key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER)] = None,
) -> Any:
    return await _guarded(_generate(request, jobs, waiter, session_of(redis, jobs), True, idempotency_key))


async def _guarded(work: Any) -> Any:
    try:
        return await work
    except A1111Failure as refused:
        return refused.response()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        return A1111Failure(503, f"Redis is unreachable: {error}", "StoreUnavailableError").response()


async def _generate(
    request: Request,
    jobs: JobService,
    waiter: Waiter,
    session: A1111Session,
    img2img: bool,
    idempotency_key: str | None,
) -> Any:
    raw = await request.body()
    params = _parse(raw)
    settings = jobs.settings
    default_model = await run_in_threadpool(_default_model, session)
    limits = UploadLimits(settings.max_upload_bytes, settings.max_upload_pixels, settings.max_upload_side)
    async with AsyncExitStack() as held:
        try:
            # The wait is admitted before the job is queued: a 429 or 503 here leaves no job behind.
            wait = await held.enter_async_context(waiter.admit(jobs.caller))
            fields = a1111.job_fields(params, img2img, default_model, limits)
            body = job_create_model(settings).model_validate(fields)
            key = validate_key(idempotency_key)
            if key is not None:
                view, _ = await run_in_threadpool(
                    jobs.submit_once,
                    key,
                    fingerprint(raw),
                    body,
                    None,
                    f"POST /sdapi/v1/{'img2img' if img2img else 'txt2img'}",
                )
            else:
                view = await run_in_threadpool(jobs.submit, body, None)
            await run_in_threadpool(jobs.confirm_replicated)  # a retry with the key finds the job
        except ValidationError as error:
            raise invalid([problem(error)]) from None
        except DiffqError as error:
            raise failure(error) from None
        job_id = view.record.id
        await run_in_threadpool(session.track, job_id, view.record.created_at.timestamp())
        log.info(
            "A1111 %s request queued job %s", "img2img" if img2img else "txt2img", job_id, extra={"job_id": job_id}
        )
        try:
            ended = await wait.result(request, jobs, job_id, settings.sdapi_timeout)
        except WaitTimedOut as timeout:
            url = public_url(request, "get_job", job_id=job_id)
            raise A1111Failure(
                504,
                f"the job is still {timeout.view.status.value} after {timeout.timeout:g} s; it goes on: {url}",
                "TimeoutError",
                job_id,
            ) from None
        except JobNotFoundError:
            raise A1111Failure(500, f"the job {job_id} was deleted while running", "JobNotFoundError", job_id) from None
    if ended is None:  # the client hung up: nobody reads this
        return JSONResponse(None, status_code=499)
    return await _answer(jobs, ended, params)


def _parse(raw: bytes) -> a1111.A1111Request:
    payload = json_object(raw)
    try:
        return a1111.A1111Request.model_validate(payload)
    except ValidationError as error:
        raise invalid([problem(error)]) from None


def _default_model(session: A1111Session) -> str | None:
    title = session.options().get("sd_model_checkpoint")
    return a1111.checkpoint_name(title) if isinstance(title, str) else None


async def _answer(jobs: JobService, view: JobView, params: a1111.A1111Request) -> JSONResponse:
    record = view.record
    headers = {"x-diffq-job-id": record.id}
    if view.status is JobStatus.FAILED:
        error = view.error
        message = error.message if error is not None else "the job failed"
        status = 422 if error is not None and error.code == "invalid_request" else 500
        raise A1111Failure(status, f"job {record.id} failed: {message}", error.code if error else "failed", record.id)
    images: list[str] = []
    if view.status is JobStatus.SUCCEEDED and params.send_images:
        for image in record.images:
            png = await run_in_threadpool(jobs.image_bytes, record.id, image.index, image)
            images.append(base64.b64encode(png).decode("ascii"))
    body = {
        "images": images,
        "parameters": a1111.parameters(params, record),
        "info": a1111.info(record, params, __version__),
    }
    return JSONResponse(body, headers=headers)
