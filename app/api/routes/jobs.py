"""``/v1/jobs``: submit, read (or long-poll), stream events of, cancel and delete jobs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager, aclosing, nullcontext
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from diffq.app.api.errors import ERROR_RESPONSES
from diffq.app.api.openapi import JOB_CREATE_BODY
from diffq.app.api.polling import PollPacer
from diffq.app.api.public_urls import public_url
from diffq.app.api.waiting import Wait, WaitTimedOut
from diffq.app.contract import events
from diffq.app.core.errors import POLL_HINT_SECONDS, JobListingDisabledError, JobNotFoundError, PollingTooFastError
from diffq.app.core.idempotency import HEADER as IDEMPOTENCY_HEADER
from diffq.app.core.inputs import has_inputs
from diffq.app.core.jobs import JobService, JobView
from diffq.app.deps import (
    CallerDep,
    JobServiceDep,
    SettingsDep,
    Submission,
    SubmissionBody,
    WaiterDep,
    rate_due,
    rate_in_submit,
    settle_rate,
)
from diffq.app.schemas.jobs import ImagePublic, JobList, JobPublic, Timings, WebhookDelivery, WebhookPublic
from diffq.app.storage.urls import image_links

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)

#: Longest long poll, in seconds; clients poll again after it.
MAX_WAIT = 60
#: Most jobs one GET /v1/jobs lists.
MAX_LIST = 100


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    openapi_extra=JOB_CREATE_BODY,
    summary="Submit a text-to-image or image-editing job",
    response_description="The job, queued; `Location` is its URL. With an `Idempotency-Key` already used with "
    "the same body: that key's job, as it is now, with `Idempotent-Replayed: true`.",
    responses={
        409: ERROR_RESPONSES[422]
        | {"description": "The `Idempotency-Key` was used with a different body (`idempotency_key_reused`)."},
        408: ERROR_RESPONSES[422] | {"description": "The body did not arrive within `DIFFQ_HTTP_BODY_TIMEOUT`."},
        415: ERROR_RESPONSES[415],
    },
)
@rate_in_submit
async def create_job(
    body: SubmissionBody,
    jobs: JobServiceDep,  # and with it the caller: each dependency named here costs its resolution
    request: Request,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_HEADER,
            description="Any unique string (e.g. a UUID), at most 255 printable ASCII characters. A retry with "
            "the same key and body gets the same job instead of a second one, within `DIFFQ_IDEMPOTENCY_TTL` "
            "seconds; the same key with another body is a 409.",
        ),
    ] = None,
) -> JobPublic:
    # A plain request (no Idempotency-Key, nothing that blocks) is submitted on the event loop: one
    # script through the asyncio client, no thread. Any other runs in a worker thread, so decoding
    # input images (and checking a webhook URL's DNS) never blocks the event loop; a request with
    # images first waits for a decode slot of its key (diffq.app.api.decode_gate) on the event
    # loop, holding no thread meanwhile.
    # The key's rate, when get_caller left it to the submit (rate_in_submit), is counted by the same
    # script: one round trip per accepted job. Every other way out settles it (settle_rate).
    keyed = idempotency_key is not None and body.fingerprint is not None
    if not keyed and JobService.submits_on_loop(body.body, body.files):
        try:
            view, replayed = await jobs.submit_async(body.body, rate_due(request)), False
        except Exception:
            await settle_rate(request)  # 401/429 first, as if counted before; else the error itself
            raise
        await settle_rate(request, response)
    else:
        await settle_rate(request, response)
        gate: AbstractAsyncContextManager[object] = nullcontext()
        if has_inputs(body.body, body.files):
            client = request.client.host if request.client is not None else "unknown"
            caller = jobs.caller
            gate = request.app.state.decode_gate.slot(caller.key.id if caller.key is not None else f"address:{client}")
        async with gate:
            view, replayed = await run_in_threadpool(_submit, jobs, body, idempotency_key)
    if jobs.settings.redis_wait_replicas > 0:  # a separate step: a retry with the key finds the job
        await run_in_threadpool(jobs.confirm_replicated)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = public_url(request, "get_job", job_id=view.record.id)
    return job_public(view, request)


def _submit(jobs: JobService, body: Submission, idempotency_key: str | None) -> tuple[JobView, bool]:
    if idempotency_key is not None and body.fingerprint is not None:
        return jobs.submit_once(idempotency_key, body.fingerprint, body.body, body.files)
    return jobs.submit(body.body, body.files), False


@router.get(
    "",
    response_model=JobList,
    summary="List the API key's newest jobs",
    response_description="The key's newest jobs that still exist, newest first.",
    responses={403: ERROR_RESPONSES[404] | {"description": "Auth is off and so is listing (`DIFFQ_JOB_LISTING`)."}},
)
def list_jobs(
    jobs: JobServiceDep,
    settings: SettingsDep,
    caller: CallerDep,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST, description="How many jobs.")] = 20,
) -> JobList:
    if caller.key is None and not settings.job_listing:
        # Without keys, job ids are unguessable and knowing one is the right to read the job: a
        # list would hand every client every job, so a deployment turns it on knowingly.
        raise JobListingDisabledError()
    return JobList(jobs=[job_public(view, request) for view in jobs.recent(limit)])


@router.get("/{job_id}", response_model=JobPublic, summary="Read a job, or wait for it to end")
async def get_job(
    job_id: str,
    jobs: JobServiceDep,  # and with it the caller
    waiter: WaiterDep,
    request: Request,
    response: Response,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT,
            description="Long poll: answer once the job has ended or after this many seconds. "
            "Counts against the key's open waits (`DIFFQ_MAX_WAITS`) while it lasts.",
        ),
    ] = 0,
) -> Response | JobPublic:
    if wait == 0:
        pacer: PollPacer = request.app.state.poll_pacer
        hold = pacer.reserve(job_id)  # a tight polling loop is held to the pace (diffq.app.api.polling)
        if hold is None:
            raise PollingTooFastError(job_id, pacer.retry_after(job_id))
        if hold > 0:
            await asyncio.sleep(hold)
    # A long poll notes the job's newest event before it reads the job, and follows from there: an end
    # after the read is an event after that one (the wait reads the job once, not twice).
    after = await waiter.last_event_id(job_id) if wait > 0 else None
    view = await jobs.get_async(job_id)  # one read through the asyncio client, on the event loop
    if after is None or view.status.is_terminal:
        return _polled(view, request, response)
    async with waiter.admit(jobs.caller) as held:  # 429/503 before any blocking read
        try:
            ended = await held.until_ended(
                jobs, job_id, wait, disconnected=request.is_disconnected, known=(after, view)
            )
        except WaitTimedOut as late:
            ended = late.view  # a long poll answers the job as it is
    if ended is None:  # the client hung up: nobody reads this, and the job goes on
        return Response(status_code=499)
    return _polled(ended, request, response)


def _polled(view: JobView, request: Request, response: Response) -> JobPublic:
    """The job; while it is not done, with ``Retry-After``: how long a poller should wait."""
    if not view.status.is_terminal:
        response.headers["Retry-After"] = str(POLL_HINT_SECONDS)
    return job_public(view, request)


def existing_job(job_id: str, jobs: JobServiceDep) -> JobView:
    """The job, or a 404 before any response (or stream) starts."""
    return jobs.get(job_id)


async def stream_wait(waiter: WaiterDep, caller: CallerDep) -> AsyncIterator[Wait]:
    """One of the key's open waits and event streams, held until the stream ends; 429 if either
    is at its limit, 503 if this process is at its own."""
    async with waiter.admit(caller, stream=True) as held:
        yield held


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Stream a job's events (server-sent events)",
    response_description="`queued`, `running`, `progress`, `preview`, then one of `succeeded`, `failed`, "
    "`canceled` (or `deleted`); each with an id to resume from with `Last-Event-ID`.",
)
async def job_events(
    job_id: str,
    request: Request,
    jobs: JobServiceDep,
    _: Annotated[JobView, Depends(existing_job)],
    held: Annotated[Wait, Depends(stream_wait)],
    last_event_id: Annotated[str | None, Header()] = None,
) -> AsyncIterable[ServerSentEvent]:
    last = last_event_id if last_event_id and events.is_event_id(last_event_id) else "0"
    async with aclosing(held.follow(job_id, last, disconnected=request.is_disconnected)) as batches:
        async for batch in batches:
            for event in batch:
                yield ServerSentEvent(id=event.id, event=event.type, data=event.data)
                if event.is_terminal:
                    return
            if not batch:  # quiet for a while: the job may have ended without an event
                ended = await _ended_without_event(jobs, job_id)
                if ended is not None:
                    yield ended
                    return


async def _ended_without_event(jobs: JobService, job_id: str) -> ServerSentEvent | None:
    """A terminal event for a job that ended or vanished without publishing one (e.g. RQ failed it)."""
    try:
        view = await run_in_threadpool(jobs.get, job_id)
    except JobNotFoundError:
        return ServerSentEvent(event="deleted", data={"status": "deleted"})
    if not view.status.is_terminal:
        return None
    error = view.error.model_dump() if view.error else None
    return ServerSentEvent(
        event=view.status.value, data={"status": view.status.value, "error": error, "images": len(view.record.images)}
    )


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    summary="Cancel a queued or running job",
    response_description="The job: `canceled` if it was queued; a running job shows `cancel_requested` and "
    "ends `canceled` (no images) within one denoising step. Canceling again is harmless; a finished job is a 409.",
    responses={409: ERROR_RESPONSES[422] | {"description": "The job already succeeded or failed."}},
)
def cancel_job(job_id: str, jobs: JobServiceDep, request: Request) -> JobPublic:
    return job_public(jobs.cancel(job_id), request)


@router.delete("/{job_id}", status_code=204, summary="Delete a job and its images")
def delete_job(job_id: str, jobs: JobServiceDep) -> Response:
    jobs.delete(job_id)
    return Response(status_code=204)


def job_public(view: JobView, request: Request) -> JobPublic:
    """The job resource, with absolute URLs for this request's host (or signed or public ones:
    ``diffq.app.storage.urls``)."""
    record = view.record
    state = request.app.state
    images = []
    for image in record.images:
        links = image_links(record, image, state.settings, state.results, partial(proxy_url, request))
        images.append(
            ImagePublic(
                index=image.index,
                url=links.url,
                seed=image.seed,
                width=image.width,
                height=image.height,
                journey_url=links.journey_url,
                content_type=image.content_type,
                url_expires_at=links.expires_at,
            )
        )
    return JobPublic(
        id=record.id,
        status=view.status,
        model=record.model,
        request=record.request,
        queue_position=view.queue_position,
        eta_seconds=view.eta_seconds,
        progress=record.progress,
        preview_url=public_url(request, "get_preview", job_id=record.id) if record.preview else None,
        cancel_requested=record.cancel_requested,
        timings=Timings(created_at=record.created_at, started_at=record.started_at, finished_at=record.finished_at),
        attempt=record.attempt,
        seeds=record.seeds,
        warnings=record.warnings,
        error=view.error,
        images=images,
        expires_at=view.expires_at,
        webhook=WebhookPublic(
            url=record.request.webhook.url,
            events=record.request.webhook.events,
            deliveries=[WebhookDelivery.model_validate(attempt) for attempt in view.webhook_deliveries or []],
        )
        if record.request.webhook is not None
        else None,
    )


def proxy_url(request: Request, kind: str, job_id: str, index: int, extension: str) -> str:
    """An image's or journey's URL on this API (``DIFFQ_PUBLIC_URL`` where set: ``public_url``)."""
    if kind == "journey":
        return public_url(request, "get_journey", job_id=job_id, index=str(index))
    return public_url(request, "get_image", job_id=job_id, index=str(index), extension=extension)
