"""``POST /v1/images/generations``: OpenAI's Images API on top of diffq jobs.

The official ``openai`` client pointed at diffq (``OpenAI(base_url="http://host:8000/v1",
api_key="any")``) works unchanged: ``client.images.generate(prompt=..., n=..., size="64x64",
response_format="b64_json" | "url")``. The request queues an ordinary diffq job, waits for it (up to
``DIFFQ_OPENAI_TIMEOUT`` seconds) and answers ``{"created", "data": [{"b64_json" | "url"}]}``.

- ``model``: a served diffq model; OpenAI's own names (``dall-e-*``, ``gpt-image-*``,
  ``chatgpt-image-*``) and no model mean the deployment's default model.
- ``size``: ``"WxH"`` (the model's limits apply) or ``"auto"`` (the model's default).
- Accepted and ignored: ``quality``, ``style``, ``user``, ``moderation``, ``safety_identifier``,
  ``partial_images``; ``background`` ``auto``/``opaque``; ``stream`` ``false``. Other values of those are a ``400``, as
  is any other field.
- ``output_format`` ``png``/``webp``/``jpeg`` is diffq's ``output_format``; ``output_compression``
  (0-100, OpenAI's default 100 = best) is the webp/jpeg ``quality`` (ignored for png).
- ``response_format=url`` gives the same URLs as the job resource (``DIFFQ_IMAGE_URLS``: proxied,
  signed or public).
- diffq's own parameters ride along (``extra_body`` in the client): ``negative_prompt``, ``steps``,
  ``seed``, ``guidance_scale``, ``scheduler``, ``metadata``.

Errors have OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: a bad request is a
``400 invalid_request_error`` naming ``param``; a job that failed is a ``500 server_error`` (``400`` if
the worker found the request invalid); a job still unfinished after the timeout is a ``504`` (the job
goes on; the message names its URL). Both carry ``x-should-retry: false`` so the client does not queue
the same work again. No live worker, or Redis down: ``503`` (retried by the client). The job's id is
in the ``x-diffq-job-id`` header. A client that hangs up while waiting cancels its job.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from functools import partial
from typing import Annotated, Any, Literal

import redis.exceptions
from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from diffq.app.api.public_urls import public_url
from diffq.app.api.routes.jobs import proxy_url
from diffq.app.api.waiting import Wait, Waiter, WaitTimedOut
from diffq.app.contract.status import JobStatus
from diffq.app.core.errors import (
    DiffqError,
    IdempotencyConflictError,
    IdempotencyInProgressError,
    InvalidRequestError,
    JobNotFoundError,
    QueueFullError,
    RequestTimeoutError,
    ServerBusyError,
    StoreBusyError,
    StoreUnavailableError,
    TooManyUploadsError,
    TooManyWaitsError,
    UnknownModelError,
    UploadTooLargeError,
)
from diffq.app.core.idempotency import HEADER as IDEMPOTENCY_HEADER
from diffq.app.core.idempotency import fingerprint, validate_key
from diffq.app.core.jobs import JobService, JobView
from diffq.app.deps import JobServiceDep, SettingsDep, WaiterDep, media_type
from diffq.app.schemas.jobs import job_create_model
from diffq.app.storage.urls import image_links

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/images", tags=["openai"])

#: Idempotency-Keys of this endpoint are kept apart from those of POST /v1/jobs.
ENDPOINT = "POST /v1/images/generations"
#: OpenAI model names that mean "the deployment's default model" here.
OPENAI_MODEL_PREFIXES = ("dall-e", "gpt-image", "chatgpt-image")
SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
#: Request fields mapped onto diffq's, for naming the OpenAI parameter in errors.
PARAM_NAMES = {"num_images": "n", "width": "size", "height": "size"}


class ImageGenerationRequest(BaseModel):
    """OpenAI's ``images.generate`` body, with diffq's own parameters as optional extras."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: StrictStr = Field(min_length=1, description="What to draw.")
    model: StrictStr | None = Field(
        None, description="A served diffq model; OpenAI's names (dall-e-*, gpt-image-*) mean the default one."
    )
    n: StrictInt | None = Field(None, ge=1, description="Images to make (diffq's `num_images`).")
    size: StrictStr | None = Field(None, description='"WIDTHxHEIGHT" within the model\'s limits, or "auto".')
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="b64_json (default): the PNGs inline; url: links to the job's images on this API."
    )
    output_format: Literal["png", "webp", "jpeg"] | None = Field(None, description="png (default), webp or jpeg.")
    background: Literal["auto", "opaque"] | None = Field(None, description="transparent is not supported.")
    stream: Literal[False] | None = Field(None, description="Streaming is not supported.")
    quality: StrictStr | None = Field(None, description="Accepted and ignored (use `steps`).")
    style: StrictStr | None = Field(None, description="Accepted and ignored.")
    user: StrictStr | None = Field(None, description="Accepted and ignored.")
    moderation: StrictStr | None = Field(None, description="Accepted and ignored.")
    safety_identifier: StrictStr | None = Field(None, description="Accepted and ignored.")
    output_compression: StrictInt | None = Field(
        None, ge=0, le=100, description="webp/jpeg quality, 0-100 (100: best); ignored for png."
    )
    partial_images: StrictInt | None = Field(None, description="Accepted and ignored (no streaming).")
    negative_prompt: StrictStr | None = Field(None, description="diffq: what to steer away from.")
    steps: StrictInt | None = Field(None, description="diffq: denoising steps.")
    seed: StrictInt | None = Field(None, description="diffq: seed of image 0 (image k uses seed + k).")
    guidance_scale: StrictFloat | StrictInt | None = Field(None, description="diffq: classifier-free guidance.")
    scheduler: StrictStr | None = Field(None, description="diffq: scheduler name.")
    metadata: StrictBool | None = Field(None, description="diffq: write generation parameters into the PNGs.")
    loras: list[dict[str, Any]] | None = Field(
        None,
        description='diffq: LoRA adapters, e.g. [{"name": "stripes", "weight": 0.8}] (GET /v1/loras); '
        "`<lora:name:weight>` in the prompt works too.",
    )


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    """OpenAI's ``ImagesResponse``."""

    created: int = Field(description="Unix time the job was created.")
    data: list[ImageData]
    size: str
    output_format: Literal["png", "webp", "jpeg"] = "png"


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """OpenAI's error body."""

    error: OpenAIErrorDetail


class OpenAIFailure(Exception):
    """An answer in OpenAI's error format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry: bool | None = None,
        job_id: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry, self.job_id, self.retry_after = retry, job_id, retry_after

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry is not None:
            headers["x-should-retry"] = "true" if self.retry else "false"
        if self.status in (429, 503) or self.retry_after is not None:
            headers["Retry-After"] = self.retry_after or "1"
        if self.status == 408:
            headers["Connection"] = "close"  # the rest of a late body is not waited for
        if self.job_id is not None:
            headers["x-diffq-job-id"] = self.job_id
        body = OpenAIError(
            error=OpenAIErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        )
        return JSONResponse(body.model_dump(), status_code=self.status, headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIError, "description": "A parameter is invalid (`param` names it), or the job found it so."},
    408: {"model": OpenAIError, "description": "The body did not arrive within `DIFFQ_HTTP_BODY_TIMEOUT`."},
    415: {"model": OpenAIError, "description": "The body is not `application/json`."},
    429: {"model": OpenAIError, "description": "The key holds as many waits as it may (`too_many_waits`): retry."},
    500: {"model": OpenAIError, "description": "The job failed or was canceled (`code` says why)."},
    503: {"model": OpenAIError, "description": "No live worker, or Redis is unreachable: retry."},
    504: {"model": OpenAIError, "description": "The job did not end within `DIFFQ_OPENAI_TIMEOUT`; it goes on."},
}


@router.post(
    "/generations",
    response_model=ImagesResponse,
    responses=ERROR_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ImageGenerationRequest.model_json_schema()}},
        }
    },
    summary="Create images (OpenAI Images API compatible): queue a job, wait for it, answer its images",
)
async def create_images(
    request: Request,
    jobs: JobServiceDep,
    settings: SettingsDep,
    waiter: WaiterDep,
    idempotency_key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER, include_in_schema=False)] = None,
) -> Any:
    try:
        return await _create_images(request, jobs, waiter, settings.openai_timeout, idempotency_key)
    except OpenAIFailure as failure:
        return failure.response()
    except DiffqError as error:  # a wait the key or the process cannot take now
        return _submit_failure(error).response()
    except redis.exceptions.MaxConnectionsError:
        return _submit_failure(StoreBusyError()).response()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        return OpenAIFailure(
            503, f"Redis is unreachable: {error}", type="server_error", code="store_unavailable", retry=True
        ).response()


async def _create_images(
    request: Request, jobs: JobService, waiter: Waiter, timeout: float, idempotency_key: str | None
) -> Any:
    content_type = request.headers.get("content-type")
    if media_type(content_type) != "application/json":
        raise OpenAIFailure(
            415,
            f"Unsupported content type: {content_type or 'none'}; send application/json.",
            code="unsupported_media_type",
        )
    raw = await request.body()
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OpenAIFailure(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise OpenAIFailure(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        params = ImageGenerationRequest.model_validate(payload)
    except ValidationError as error:
        raise _parameter_failure(error) from None
    body = _job_create(params, jobs)
    # The wait is admitted before the job is queued: a 429 or 503 here leaves no job behind.
    async with waiter.admit(jobs.caller) as held:
        try:
            key = validate_key(idempotency_key)
            if key is not None:
                view, _ = await run_in_threadpool(jobs.submit_once, key, fingerprint(raw), body, None, ENDPOINT)
            else:
                view = await run_in_threadpool(jobs.submit, body, None)
            await run_in_threadpool(jobs.confirm_replicated)
        except DiffqError as error:
            raise _submit_failure(error) from None
        job_id = view.record.id
        log.info("OpenAI images request queued job %s", job_id, extra={"job_id": job_id})
        ended = await _wait(request, jobs, held, job_id, timeout)
    if ended is None:  # the client hung up: nobody will read the result
        return JSONResponse({"error": None}, status_code=499)
    return await _answer(request, jobs, ended, params.response_format or "b64_json")


def _job_create(params: ImageGenerationRequest, jobs: JobService) -> Any:
    """The diffq ``JobCreate`` for an OpenAI request."""
    fields: dict[str, Any] = {"prompt": params.prompt}
    model = params.model
    if model is not None and model.lower().startswith(OPENAI_MODEL_PREFIXES):
        model = None
    if model is not None:
        fields["model"] = model
    if params.n is not None:
        fields["num_images"] = params.n
    if params.size is not None and params.size.strip().lower() != "auto":
        match = SIZE.match(params.size)
        if match is None:
            raise OpenAIFailure(
                400,
                f"Invalid value: {params.size!r}. Supported values are 'auto' and "
                "'WIDTHxHEIGHT' in pixels, e.g. '64x64' (GET /v1/models lists each model's sizes).",
                param="size",
                code="invalid_value",
            )
        fields["width"], fields["height"] = int(match.group(1)), int(match.group(2))
    if params.output_format is not None:
        fields["output_format"] = params.output_format
        if params.output_format != "png" and params.output_compression is not None:
            fields["quality"] = max(1, params.output_compression)
    for name in ("negative_prompt", "steps", "seed", "guidance_scale", "scheduler", "metadata", "loras"):
        value = getattr(params, name)
        if value is not None:
            fields[name] = value
    try:
        return job_create_model(jobs.settings).model_validate(fields)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else None
        param = PARAM_NAMES.get(field or "", field)
        raise OpenAIFailure(
            400, f"Invalid value for '{param}': {first['msg']}.", param=param, code="invalid_value"
        ) from None


def _parameter_failure(error: ValidationError) -> OpenAIFailure:
    """The first problem of an OpenAI request, worded as OpenAI words it."""
    first = error.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    kind = first["type"]
    if kind == "missing":
        return OpenAIFailure(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if kind == "extra_forbidden":
        return OpenAIFailure(
            400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    if kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        return OpenAIFailure(
            400,
            f"Invalid value: {first.get('input')!r}. Supported values are: {expected}.",
            param=param,
            code="invalid_value",
        )
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return OpenAIFailure(
            400, f"Invalid type for '{param}': {first['msg'].lower()}.", param=param, code="invalid_type"
        )
    return OpenAIFailure(400, f"Invalid value for '{param}': {first['msg']}.", param=param, code="invalid_value")


def _submit_failure(error: DiffqError) -> OpenAIFailure:
    if isinstance(error, UnknownModelError):
        problem = error.problems[0].message if error.problems else error.message
        if "no live workers" in problem:
            return OpenAIFailure(
                503,
                "No live worker serves a model right now; start one (diffq worker).",
                type="server_error",
                code="no_workers",
                retry=True,
            )
        return OpenAIFailure(400, f"Invalid value for 'model': {problem}", param="model", code="model_not_found")
    if isinstance(error, InvalidRequestError):
        first_problem = error.problems[0] if error.problems else None
        param = PARAM_NAMES.get(first_problem.field, first_problem.field) if first_problem else None
        message = f"Invalid value for '{param}': {first_problem.message}" if first_problem else error.message
        return OpenAIFailure(400, message, param=param, code="invalid_value")
    if isinstance(error, RequestTimeoutError):
        return OpenAIFailure(408, error.message, code=error.code, retry=False)
    if isinstance(error, TooManyWaitsError | TooManyUploadsError):
        return OpenAIFailure(429, error.message, type="rate_limit_error", code=error.code, retry=True)
    if isinstance(error, ServerBusyError):
        return OpenAIFailure(503, error.message, type="server_error", code=error.code, retry=True)
    if isinstance(error, StoreUnavailableError):
        retry_after = (error.headers or {}).get("Retry-After")
        return OpenAIFailure(
            503, error.message, type="server_error", code=error.code, retry=True, retry_after=retry_after
        )
    if isinstance(error, QueueFullError):
        return OpenAIFailure(
            429,
            error.message,
            type="server_error",
            code=error.code,
            retry=True,
            retry_after=(error.headers or {}).get("Retry-After"),
        )
    if isinstance(error, UploadTooLargeError):
        return OpenAIFailure(413, error.message, code=error.code)
    if isinstance(error, IdempotencyConflictError | IdempotencyInProgressError):
        return OpenAIFailure(409, error.message, code=error.code, retry=isinstance(error, IdempotencyInProgressError))
    if isinstance(error, JobNotFoundError):
        return OpenAIFailure(404, error.message, code=error.code)
    return OpenAIFailure(500, error.message, type="server_error", code=error.code, retry=False)


async def _wait(request: Request, jobs: JobService, held: Wait, job_id: str, timeout: float) -> JobView | None:
    """The job once it has ended (``diffq.app.api.waiting``); ``None`` if the client hung up first (the
    job is then canceled). Its time up or the job deleted: OpenAI-shaped errors."""
    try:
        return await held.result(request, jobs, job_id, timeout)
    except WaitTimedOut as late:
        url = public_url(request, "get_job", job_id=job_id)
        raise OpenAIFailure(
            504,
            f"The image job is still {late.view.status.value} after {timeout:g} s; it goes on: {url}",
            type="server_error",
            code="timeout",
            retry=False,
            job_id=job_id,
        ) from None
    except JobNotFoundError:
        raise OpenAIFailure(
            500,
            f"The image job {job_id} was deleted while running.",
            type="server_error",
            code="job_deleted",
            retry=False,
            job_id=job_id,
        ) from None


async def _answer(request: Request, jobs: JobService, view: JobView, response_format: str) -> JSONResponse:
    record = view.record
    headers = {"x-diffq-job-id": record.id}
    if view.status is not JobStatus.SUCCEEDED:
        error = view.error
        code = error.code if error is not None else view.status.value
        message = error.message if error is not None else f"the job was {view.status.value}"
        if code == "invalid_request":
            raise OpenAIFailure(400, message, code=code, retry=False, job_id=record.id)
        raise OpenAIFailure(
            500,
            f"The image job {record.id} {view.status.value}: {message}",
            type="server_error",
            code=code,
            retry=False,
            job_id=record.id,
        )
    data = []
    for image in record.images:
        if response_format == "url":
            links = image_links(record, image, jobs.settings, jobs.results, partial(proxy_url, request))
            data.append(ImageData(url=links.url))
        else:
            try:
                png = await run_in_threadpool(jobs.image_bytes, record.id, image.index, image)
            except StoreUnavailableError as error:
                raise OpenAIFailure(
                    503, error.message, type="server_error", code=error.code, retry=True, job_id=record.id
                ) from None
            data.append(ImageData(b64_json=base64.b64encode(png).decode("ascii")))
    size = f"{record.request.width}x{record.request.height}"
    if record.images:
        size = f"{record.images[0].width}x{record.images[0].height}"
    body = ImagesResponse(
        created=int(record.created_at.timestamp()), data=data, size=size, output_format=record.request.output_format
    )
    return JSONResponse(body.model_dump(exclude_none=True), headers=headers)
