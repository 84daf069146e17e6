"""``POST /v1/images/edits`` and ``/v1/images/variations``: the rest of OpenAI's Images API on diffq jobs.

Both take multipart/form-data as the official ``openai`` client sends it, queue an ordinary diffq job
(same queue, limits, fair share, idempotency as ``POST /v1/jobs``), wait for it up to
``DIFFQ_OPENAI_TIMEOUT`` seconds and answer OpenAI's ``{"created", "data": [...]}`` (``b64_json`` by
default, or ``url``: the job's image URLs). Errors have OpenAI's body (``diffq.app.api.routes.openai_images``).

- ``edits``: one ``image`` (or ``image[]`` with one file; diffq edits one image per request) and an
  optional ``mask``, as OpenAI defines it: a PNG the image's size whose fully transparent pixels
  (alpha 0) are the ones to edit. Without a mask, an image with transparent pixels is repainted
  there (diffq's ``mask: "alpha"``); an opaque one goes through image-to-image.
- ``variations``: image-to-image of ``image``. diffq needs a prompt: ``prompt`` as an extra field, or
  else the prompt diffq wrote into the PNG's metadata when it made the image.
- ``size``: ``WIDTHxHEIGHT`` scales the input to it; omitted or ``auto``: the input's size.
- ``output_format``: ``png``, ``webp`` or ``jpeg`` (diffq's ``output_format``); ``output_compression``
  its quality for webp and jpeg. Accepted and ignored: ``quality``, ``user``, ``input_fidelity``,
  ``partial_images``; ``background`` ``auto``/``opaque``; ``stream`` false.
- diffq's own parameters as extra form fields (``extra_body`` in the client): ``negative_prompt``,
  ``steps``, ``seed``, ``guidance_scale``, ``scheduler``, ``strength``, ``metadata``.
"""

from __future__ import annotations

import base64
import logging
from contextlib import AsyncExitStack
from functools import partial
from typing import Annotated, Any, Literal

import redis.exceptions
from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from diffq.app.api.routes.jobs import proxy_url
from diffq.app.api.routes.openai_images import (
    ERROR_RESPONSES,
    OPENAI_MODEL_PREFIXES,
    SIZE,
    ImageData,
    ImagesResponse,
    OpenAIFailure,
    _parameter_failure,
    _submit_failure,
    _wait,
)
from diffq.app.api.waiting import Waiter
from diffq.app.contract.status import JobStatus
from diffq.app.core.errors import DiffqError, InvalidRequestError, StoreUnavailableError
from diffq.app.core.idempotency import HEADER as IDEMPOTENCY_HEADER
from diffq.app.core.idempotency import fingerprint_multipart, validate_key
from diffq.app.core.inputs import ALPHA_MASK
from diffq.app.core.jobs import JobService, JobView
from diffq.app.core.openai_inputs import openai_mask, png_prompt
from diffq.app.core.uploads import UploadLimits, decode_image
from diffq.app.deps import JobServiceDep, WaiterDep, read_form
from diffq.app.schemas.jobs import job_create_model
from diffq.app.storage.urls import image_links

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/images", tags=["openai"])

FILE_FIELDS = ("image", "image[]", "mask")
#: diffq JobCreate fields by the OpenAI parameter a client sent them as.
PARAM_NAMES = {"num_images": "n", "width": "size", "height": "size", "image": "image", "mask": "mask"}
EXTRAS = ("negative_prompt", "steps", "seed", "guidance_scale", "scheduler", "strength", "metadata")


class _Common(BaseModel):
    """Fields of both endpoints (form fields arrive as strings: lax types)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None
    n: int | None = Field(None, ge=1)
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    user: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    strength: float | None = None
    metadata: bool | None = None


class ImageEditForm(_Common):
    """OpenAI's ``images.edit`` form, with diffq's parameters as optional extras."""

    prompt: str = Field(min_length=1)
    output_format: Literal["png", "webp", "jpeg"] | None = None
    background: Literal["auto", "opaque"] | None = None
    stream: Literal["false", "False"] | None = None
    quality: str | None = None
    input_fidelity: str | None = None
    output_compression: int | None = None
    partial_images: int | None = None


class ImageVariationForm(_Common):
    """OpenAI's ``images.create_variation`` form; ``prompt`` is diffq's (see the module)."""

    prompt: str | None = None


def _form_schema(model: type[BaseModel], files: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["properties"] = {**files, **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_FILE = {"type": "string", "format": "binary"}


@router.post(
    "/edits",
    response_model=ImagesResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=_form_schema(ImageEditForm, {"image": _FILE, "mask": _FILE}),
    summary="Edit an image (OpenAI Images API compatible): inpainting with a mask, else image-to-image",
)
async def create_edit(
    request: Request,
    jobs: JobServiceDep,
    waiter: WaiterDep,
    idempotency_key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER, include_in_schema=False)] = None,
) -> Any:
    return await _guarded(_run(request, jobs, waiter, ImageEditForm, idempotency_key))


@router.post(
    "/variations",
    response_model=ImagesResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=_form_schema(ImageVariationForm, {"image": _FILE}),
    summary="Variations of an image (OpenAI Images API compatible): image-to-image",
)
async def create_variation(
    request: Request,
    jobs: JobServiceDep,
    waiter: WaiterDep,
    idempotency_key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER, include_in_schema=False)] = None,
) -> Any:
    return await _guarded(_run(request, jobs, waiter, ImageVariationForm, idempotency_key))


async def _guarded(work: Any) -> Any:
    try:
        return await work
    except OpenAIFailure as failure:
        return failure.response()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        return OpenAIFailure(
            503, f"Redis is unreachable: {error}", type="server_error", code="store_unavailable", retry=True
        ).response()


async def _run(
    request: Request, jobs: JobService, waiter: Waiter, form_model: type[_Common], idempotency_key: str | None
) -> Any:
    values, files = await _read_form(request, jobs, form_model is ImageEditForm)
    try:
        params = form_model.model_validate(values)
    except ValidationError as error:
        raise _parameter_failure(error) from None
    async with AsyncExitStack() as held:
        try:
            # The wait is admitted before the job is queued: a 429 or 503 here leaves no job behind.
            wait = await held.enter_async_context(waiter.admit(jobs.caller))
            fields, uploads = await run_in_threadpool(_job_inputs, params, files, jobs)
            body = job_create_model(jobs.settings).model_validate(fields)
            key = validate_key(idempotency_key)
            if key is not None:
                digest = fingerprint_multipart(values, files)
                view, _ = await run_in_threadpool(
                    jobs.submit_once, key, digest, body, uploads, f"POST {request.url.path}"
                )
            else:
                view = await run_in_threadpool(jobs.submit, body, uploads)
            await run_in_threadpool(jobs.confirm_replicated)  # a retry with the key finds the job
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            name = str(first["loc"][0]) if first["loc"] else None
            param = PARAM_NAMES.get(name or "", name)
            raise OpenAIFailure(
                400, f"Invalid value for '{param}': {first['msg']}.", param=param, code="invalid_value"
            ) from None
        except DiffqError as error:
            raise _submit_failure(error) from None
        job_id = view.record.id
        log.info(
            "OpenAI %s request queued job %s", request.url.path.rsplit("/", 1)[-1], job_id, extra={"job_id": job_id}
        )
        ended = await _wait(request, jobs, wait, job_id, jobs.settings.openai_timeout)
    if ended is None:
        return JSONResponse({"error": None}, status_code=499)
    return await _answer(request, jobs, ended, params.response_format or "b64_json")


async def _read_form(request: Request, jobs: JobService, edit: bool) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Form fields and the uploaded files; ``image[]`` is ``image``."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise OpenAIFailure(
            400, "The request must be multipart/form-data with an 'image' file.", param="image", code="invalid_request"
        )
    limit = jobs.settings.max_upload_bytes
    try:
        form = await read_form(request, max_files=8, max_fields=64, max_part_size=limit * 4 // 3 + 4096)
    except InvalidRequestError as error:
        raise OpenAIFailure(
            400,
            f"We could not parse the multipart body of your request: {error.problems[0].message}.",
            param="image",
            code="invalid_request",
        ) from None
    values: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    try:
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                values[name] = value
                continue
            field = "image" if name == "image[]" else name
            if name not in FILE_FIELDS or (field == "mask" and not edit):
                raise OpenAIFailure(400, f"Unrecognized file parameter: {name}", param=name, code="unknown_parameter")
            if field in files:
                raise OpenAIFailure(400, f"diffq takes one '{field}' per request.", param=field, code="invalid_value")
            files[field] = await value.read()
    finally:
        await form.close()
    if "image" not in files:
        raise OpenAIFailure(
            400, "Missing required parameter: 'image'.", param="image", code="missing_required_parameter"
        )
    return values, files


def _job_inputs(params: _Common, files: dict[str, bytes], jobs: JobService) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``JobCreate`` fields and the files for ``submit`` (runs in a worker thread: decodes images)."""
    settings = jobs.settings
    limits = UploadLimits(settings.max_upload_bytes, settings.max_upload_pixels, settings.max_upload_side)
    image = decode_image(files["image"], "image", limits)
    fields: dict[str, Any] = {}
    uploads = {"image": image.png}
    if isinstance(params, ImageEditForm):
        fields["prompt"] = params.prompt
        if "mask" in files:
            uploads["mask"] = openai_mask(files["mask"], limits)
            fields["mode"] = "inpaint"
        elif image.has_alpha:
            fields["mode"], fields["mask"] = "inpaint", ALPHA_MASK
        else:
            fields["mode"] = "img2img"
    elif isinstance(params, ImageVariationForm):
        fields["prompt"] = params.prompt or png_prompt(files["image"])
        fields["mode"] = "img2img"
    model = params.model
    if model is not None and not model.lower().startswith(OPENAI_MODEL_PREFIXES):
        fields["model"] = model
    if params.n is not None:
        fields["num_images"] = params.n
    if params.size is not None and params.size.strip().lower() != "auto":
        match = SIZE.match(params.size)
        if match is None:
            raise OpenAIFailure(
                400,
                f"Invalid value: {params.size!r}. Supported values are 'auto' and 'WIDTHxHEIGHT' "
                "in pixels, e.g. '64x64'.",
                param="size",
                code="invalid_value",
            )
        fields["width"], fields["height"], fields["resize"] = int(match.group(1)), int(match.group(2)), True
    output_format = getattr(params, "output_format", None)
    if output_format is not None:
        fields["output_format"] = output_format
        compression = getattr(params, "output_compression", None)
        if output_format != "png" and compression is not None:
            fields["quality"] = max(1, compression)
    for name in EXTRAS:
        value = getattr(params, name)
        if value is not None:
            fields[name] = value
    return fields, uploads


async def _answer(request: Request, jobs: JobService, view: JobView, response_format: str) -> JSONResponse:
    record = view.record
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
    first = record.images[0] if record.images else None
    size = f"{first.width}x{first.height}" if first else f"{record.request.width}x{record.request.height}"
    body = ImagesResponse(
        created=int(record.created_at.timestamp()), data=data, size=size, output_format=record.request.output_format
    )
    return JSONResponse(body.model_dump(exclude_none=True), headers={"x-diffq-job-id": record.id})
