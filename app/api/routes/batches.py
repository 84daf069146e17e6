"""``/v1/batches``: many jobs in one request; their progress, results and images as one."""

from __future__ import annotations

import json
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from diffq.app.api.errors import ERROR_RESPONSES
from diffq.app.api.openapi import BATCH_CREATE_BODY
from diffq.app.api.public_urls import public_url
from diffq.app.api.routes.jobs import proxy_url
from diffq.app.core import batch_items
from diffq.app.core.batch_items import BatchSpec
from diffq.app.core.batch_results import ItemView, item_result
from diffq.app.core.batches import BatchService, BatchView
from diffq.app.core.errors import FieldProblem, InvalidRequestError, JobListingDisabledError, UnsupportedMediaTypeError
from diffq.app.core.idempotency import HEADER as IDEMPOTENCY_HEADER
from diffq.app.core.idempotency import fingerprint, fingerprint_multipart, validate_key
from diffq.app.deps import CallerDep, JobServiceDep, SettingsDep, _as_request_error, media_type, read_form
from diffq.app.schemas.batches import BatchCounts, BatchCreate, BatchItemPublic, BatchItems, BatchList, BatchPublic
from diffq.app.storage.urls import image_links

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=ERROR_RESPONSES)

MAX_PAGE = 1000
#: Multipart fields of a batch besides its file and shared inputs.
FORM_FIELDS = ("prompt_template", "defaults", "webhook", "priority", "metadata")
JSON_FORM_FIELDS = ("defaults", "webhook", "metadata")
JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines")


@router.post(
    "",
    status_code=202,
    response_model=BatchPublic,
    summary="Submit a batch of jobs",
    openapi_extra=BATCH_CREATE_BODY,
    response_description="The batch, every item queued; `Location` is its URL.",
    responses={409: ERROR_RESPONSES[422], 415: ERROR_RESPONSES[415]},
)
async def create_batch(
    request: Request,
    response: Response,
    jobs: JobServiceDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_HEADER,
            description="Makes the whole batch safe to retry: the same key and body get the same batch.",
        ),
    ] = None,
) -> BatchPublic:
    spec, digest = await _read_batch(request, settings)
    batches = BatchService(jobs)
    key = validate_key(idempotency_key)
    if key is not None:
        view, replayed = await run_in_threadpool(batches.submit_once, key, digest, spec)
    else:
        view, replayed = await run_in_threadpool(batches.submit, spec), False
    await run_in_threadpool(jobs.confirm_replicated)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = public_url(request, "get_batch", batch_id=view.record.id)
    return batch_public(view, request)


@router.get("", response_model=BatchList, summary="List the API key's newest batches")
def list_batches(
    jobs: JobServiceDep,
    settings: SettingsDep,
    caller: CallerDep,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    if caller.key is None and not settings.job_listing:
        raise JobListingDisabledError()
    return BatchList(batches=[batch_public(v, request) for v in BatchService(jobs).recent(limit)])


@router.get("/{batch_id}", response_model=BatchPublic, summary="Read a batch: counts, progress, ETA")
def get_batch(batch_id: str, jobs: JobServiceDep, request: Request) -> BatchPublic:
    return batch_public(BatchService(jobs).get(batch_id), request)


@router.get("/{batch_id}/items", response_model=BatchItems, summary="A page of a batch's items")
def get_batch_items(
    batch_id: str,
    jobs: JobServiceDep,
    request: Request,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> BatchItems:
    views = BatchService(jobs).items(batch_id, offset, limit)
    items = [BatchItemPublic.model_validate(_result(item, request)) for item in views]
    return BatchItems(items=items, next_offset=offset + len(views) if len(views) == limit else None)


@router.get(
    "/{batch_id}/results.jsonl",
    summary="One JSON line per item: custom_id, status, image URLs, seeds, error",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/jsonl": {}}}},
)
def get_batch_results(batch_id: str, jobs: JobServiceDep, request: Request) -> StreamingResponse:
    items = BatchService(jobs).each_item(batch_id)
    first = next(items, None)  # a missing batch is a 404 before the response starts

    def lines() -> Any:
        if first is not None:
            yield json.dumps(_result(first, request)) + "\n"
        for item in items:
            yield json.dumps(_result(item, request)) + "\n"

    return StreamingResponse(lines(), media_type="application/jsonl")


@router.get(
    "/{batch_id}/images.zip",
    summary="The succeeded items' images, named by custom_id, streamed",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}}},
)
def get_batch_images(batch_id: str, jobs: JobServiceDep) -> StreamingResponse:
    batches = BatchService(jobs)
    batches.get(batch_id)  # 404 before the response starts
    return StreamingResponse(
        batches.zip_chunks(batch_id),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="batch-{batch_id}.zip"'},
    )


@router.post("/{batch_id}/cancel", response_model=BatchPublic, summary="Cancel every unended item")
def cancel_batch(batch_id: str, jobs: JobServiceDep, request: Request) -> BatchPublic:
    return batch_public(BatchService(jobs).cancel(batch_id), request)


@router.delete("/{batch_id}", status_code=204, summary="Delete a batch, its items and their images")
def delete_batch(batch_id: str, jobs: JobServiceDep) -> Response:
    BatchService(jobs).delete(batch_id)
    return Response(status_code=204)


def batch_public(view: BatchView, request: Request) -> BatchPublic:
    record = view.record
    counts = BatchCounts(
        total=record.total,
        queued=view.queued,
        running=view.running,
        succeeded=record.succeeded,
        failed=record.failed,
        canceled=record.canceled,
    )
    url = public_url(request, "get_batch", batch_id=record.id)
    return BatchPublic(
        id=record.id,
        status=view.status,
        model=record.model,
        priority=record.priority,
        counts=counts,
        progress=round(record.ended / record.total, 4) if record.total else 1.0,
        eta_seconds=view.eta_seconds,
        created_at=record.created_at,
        completed_at=record.completed_at,
        expires_at=view.expires_at,
        metadata=record.metadata,
        url=url,
        items_url=f"{url}/items",
        results_url=f"{url}/results.jsonl",
        images_url=f"{url}/images.zip",
    )


def _result(item: ItemView, request: Request) -> dict[str, Any]:
    urls: list[str] = []
    if item.record is not None:
        state = request.app.state
        urls = [
            image_links(item.record, image, state.settings, state.results, partial(proxy_url, request)).url
            for image in item.record.images
        ]
    return item_result(item, urls)


async def _read_batch(request: Request, settings: SettingsDep) -> tuple[BatchSpec, str]:
    """The batch in any of its forms, and the fingerprint of its body (for an Idempotency-Key)."""
    content_type = request.headers.get("content-type")
    kind = media_type(content_type)
    if kind == "multipart/form-data":
        return await _read_multipart(request, settings)
    if kind not in ("application/json", *JSONL_TYPES):
        raise UnsupportedMediaTypeError(content_type)
    raw = await request.body()
    if kind in JSONL_TYPES:
        return BatchSpec(items=batch_items.from_jsonl(raw, "body")), fingerprint(raw)
    if raw.lstrip().startswith(b"["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as error:
            raise InvalidRequestError([FieldProblem("body", f"is not valid JSON: {error}")]) from None
        if not all(isinstance(item, dict) for item in items):
            raise InvalidRequestError([FieldProblem("body", "must be a list of job objects")])
        return BatchSpec(items=batch_items.from_list(items)), fingerprint(raw)
    try:
        body = BatchCreate.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise _as_request_error(exc) from None
    return BatchSpec.from_body(body, _json_items(body)), fingerprint(raw)


def _json_items(body: BatchCreate) -> list[batch_items.RawItem]:
    if body.items is not None and body.prompt_template is None and body.rows is None:
        return batch_items.from_list(body.items)
    if body.items is None and body.prompt_template is not None and body.rows is not None:
        return batch_items.from_template(body.prompt_template, batch_items.json_rows(body.rows))
    raise InvalidRequestError([FieldProblem("items", "send either items, or prompt_template with rows")])


async def _read_multipart(request: Request, settings: SettingsDep) -> tuple[BatchSpec, str]:
    form = await read_form(
        request, max_files=9, max_fields=len(FORM_FIELDS) + 9, max_part_size=settings.max_request_bytes
    )
    values: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    names: dict[str, str] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            files[name] = await value.read()
            names[name] = (value.filename or "").lower()
        elif name in FORM_FIELDS:
            values[name] = value
        else:
            raise InvalidRequestError(
                [
                    FieldProblem(
                        name,
                        f"is not a batch field; fields: {', '.join(FORM_FIELDS)}, "
                        "a `file` part, and shared input images as other file parts",
                    )
                ]
            )
    await form.close()
    for name in JSON_FORM_FIELDS:
        if name in values:
            try:
                values[name] = json.loads(values[name])
            except json.JSONDecodeError:
                raise InvalidRequestError([FieldProblem(name, "must be a JSON object")]) from None
    if "file" not in files:
        raise InvalidRequestError(
            [
                FieldProblem(
                    "file", "is required: a JSONL file of jobs, or a CSV (or JSON list) of rows with prompt_template"
                )
            ]
        )
    data, filename = files.pop("file"), names.pop("file")
    template = values.get("prompt_template")
    if template is None:
        items = batch_items.from_jsonl(data)
    elif filename.endswith(".json"):
        rows = _json_list(data)
        items = batch_items.from_template(template, batch_items.json_rows(rows))
    else:
        items = batch_items.from_template(template, batch_items.csv_rows(data))
    try:
        body = BatchCreate.model_validate({k: v for k, v in values.items() if k != "prompt_template"})
    except ValidationError as exc:
        raise _as_request_error(exc) from None
    spec = BatchSpec.from_body(body, items)
    spec.inputs.update(files)
    fields = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()}
    return spec, fingerprint_multipart(fields, {"file": data, **files})


def _json_list(data: bytes) -> list[dict[str, Any]]:
    try:
        rows = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequestError([FieldProblem("file", f"is not valid JSON: {error}")]) from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise InvalidRequestError([FieldProblem("file", "must be a JSON list of row objects")])
    return rows
