"""``/sdapi/v1``: the part of AUTOMATIC1111's API that clients use (webuiapi, Open WebUI, SillyTavern, bots).

``txt2img`` and ``img2img`` queue an ordinary diffq job (same queue, limits, fair share, idempotency
and timeouts as ``POST /v1/jobs``; the mapping is ``app.core.a1111``), wait for it up to
``DIFFQ_SDAPI_TIMEOUT`` seconds and answer A1111's ``{"images", "parameters", "info"}``. Options and
jobs are per API key (``app.core.a1111_session``): ``sd_model_checkpoint`` is that key's default
model, and ``progress``/``interrupt``/``skip`` see only that key's ``/sdapi/v1`` jobs.

Errors have A1111's body, ``{"error", "detail", "body", "errors"}``: ``422`` for a request that cannot
map (``detail`` names the field and what is accepted), ``500`` for a failed job, ``503`` when no
worker is live or Redis is down, ``504`` when the job outlasts the wait (it goes on; ``detail`` names
its URL). A job ended by ``interrupt`` answers ``200`` with no images, as A1111 does. The job's id is
in the ``x-diffq-job-id`` header and in ``info``. Auth: HTTP Basic (the API key as the password) or
Bearer, as on every ``/v1`` route.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Annotated, Any

import redis.exceptions
from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app import __version__
from app.api.errors import _status_for
from app.api.waiting import WaitTimedOut, until_ended
from app.contract.status import JobStatus
from app.core import a1111
from app.core.a1111_session import A1111Session
from app.core.errors import DiffqError, FieldProblem, InvalidRequestError, JobNotFoundError, UnknownModelError
from app.core.idempotency import HEADER as IDEMPOTENCY_HEADER
from app.core.idempotency import fingerprint, validate_key
from app.core.jobs import JobService, JobView
from app.core.uploads import UploadLimits
from app.deps import JobServiceDep, RedisDep
from app.schemas.a1111 import (
    A1111Error,
    GenerationAnswer,
    ProgressAnswer,
    SamplerItem,
    ScheduleItem,
    ScriptsList,
    SdModel,
    UpscalerItem,
)
from app.schemas.jobs import job_create_model

log = logging.getLogger(__name__)

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])

#: diffq field names as A1111 calls them, for naming the field in errors.
A1111_NAMES = {"num_images": "batch_size", "guidance_scale": "cfg_scale", "scheduler": "sampler_name",
               "strength": "denoising_strength", "image": "init_images"}
GENERATION_ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": A1111Error, "description": "A field cannot map onto diffq (`detail` names it and what is "
          "accepted)."},
    500: {"model": A1111Error, "description": "The job failed (`detail` says why)."},
    503: {"model": A1111Error, "description": "No live worker, or Redis is unreachable: retry."},
    504: {"model": A1111Error, "description": "The job did not end within `DIFFQ_SDAPI_TIMEOUT`; it goes on."},
}
OPTIONS_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"sd_model_checkpoint": {"type": "string"}}}}}}}
REQUEST_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": a1111.A1111Request.model_json_schema()}}}}


class A1111Failure(Exception):
    """An answer in A1111's error format."""

    def __init__(self, status: int, message: str, error: str = "HTTPException", job_id: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error, self.job_id = status, message, error, job_id

    def response(self) -> JSONResponse:
        headers = {"x-diffq-job-id": self.job_id} if self.job_id else {}
        if self.status == 503:
            headers["Retry-After"] = "1"
        body = {"error": self.error, "detail": self.message, "body": "", "errors": f"{self.status}: {self.message}"}
        return JSONResponse(body, status_code=self.status, headers=headers)


def _session(redis: Any, jobs: JobService) -> A1111Session:
    return A1111Session(redis, jobs.caller.scope, jobs.settings.job_ttl)


@router.post("/txt2img", openapi_extra=REQUEST_BODY, response_model=GenerationAnswer, responses=GENERATION_ERRORS,
             summary="A1111 txt2img: queue a job, wait, answer base64 PNGs")
async def txt2img(request: Request, jobs: JobServiceDep, redis: RedisDep,
                  idempotency_key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER)] = None) -> Any:
    return await _guarded(_generate(request, jobs, _session(redis, jobs), False, idempotency_key))


@router.post("/img2img", openapi_extra=REQUEST_BODY, response_model=GenerationAnswer, responses=GENERATION_ERRORS,
             summary="A1111 img2img (inpainting with `mask`): queue a job, wait, answer base64 PNGs")
async def img2img(request: Request, jobs: JobServiceDep, redis: RedisDep,
                  idempotency_key: Annotated[str | None, Header(alias=IDEMPOTENCY_HEADER)] = None) -> Any:
    return await _guarded(_generate(request, jobs, _session(redis, jobs), True, idempotency_key))


async def _guarded(work: Any) -> Any:
    try:
        return await work
    except A1111Failure as failure:
        return failure.response()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
        return A1111Failure(503, f"Redis is unreachable: {error}", "StoreUnavailableError").response()


async def _generate(request: Request, jobs: JobService, session: A1111Session, img2img: bool,
                    idempotency_key: str | None) -> Any:
    raw = await request.body()
    params = _parse(raw)
    settings = jobs.settings
    default_model = await run_in_threadpool(_default_model, session)
    limits = UploadLimits(settings.max_upload_bytes, settings.max_upload_pixels, settings.max_upload_side)
    try:
        fields = a1111.job_fields(params, img2img, default_model, limits)
        body = job_create_model(settings).model_validate(fields)
        key = validate_key(idempotency_key)
        if key is not None:
            view, _ = await run_in_threadpool(jobs.submit_once, key, fingerprint(raw), body, None)
        else:
            view = await run_in_threadpool(jobs.submit, body, None)
    except ValidationError as error:
        raise _invalid([_problem(error)]) from None
    except DiffqError as error:
        raise _failure(error) from None
    job_id = view.record.id
    await run_in_threadpool(session.track, job_id, view.record.created_at.timestamp())
    log.info("A1111 %s request queued job %s", "img2img" if img2img else "txt2img", job_id, extra={"job_id": job_id})
    try:
        ended = await until_ended(request, jobs, view, settings.sdapi_timeout)
    except WaitTimedOut as timeout:
        url = request.url_for("get_job", job_id=job_id)
        raise A1111Failure(504, f"the job is still {timeout.view.status.value} after {timeout.timeout:g} s; it goes "
                           f"on: {url}", "TimeoutError", job_id) from None
    except JobNotFoundError:
        raise A1111Failure(500, f"the job {job_id} was deleted while running", "JobNotFoundError", job_id) from None
    if ended is None:  # the client hung up: nobody reads this
        return JSONResponse(None, status_code=499)
    return await _answer(jobs, ended, params)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise A1111Failure(422, "the body must be a JSON object", "RequestValidationError") from None
    if not isinstance(payload, dict):
        raise A1111Failure(422, "the body must be a JSON object", "RequestValidationError")
    return payload


def _parse(raw: bytes) -> a1111.A1111Request:
    payload = _json_object(raw)
    try:
        return a1111.A1111Request.model_validate(payload)
    except ValidationError as error:
        raise _invalid([_problem(error)]) from None


def _default_model(session: A1111Session) -> str | None:
    title = session.options().get("sd_model_checkpoint")
    return a1111.checkpoint_name(title) if isinstance(title, str) else None


def _problem(error: ValidationError) -> FieldProblem:
    first = error.errors(include_url=False)[0]
    name = ".".join(str(part) for part in first["loc"]) or "body"
    return FieldProblem(A1111_NAMES.get(name, name), str(first["msg"]))


def _invalid(problems: list[FieldProblem]) -> A1111Failure:
    message = "; ".join(f"{p.field}: {p.message}" for p in problems)
    return A1111Failure(422, message, "RequestValidationError")


def _failure(error: DiffqError) -> A1111Failure:
    if isinstance(error, UnknownModelError) and any("no live workers" in p.message for p in error.problems):
        return A1111Failure(503, "no live worker serves a model right now; start one (diffq worker)",
                            "UnknownModelError")
    if isinstance(error, InvalidRequestError):
        renamed = [FieldProblem(A1111_NAMES.get(p.field, p.field), p.message) for p in error.problems]
        if isinstance(error, UnknownModelError):
            renamed = [FieldProblem("sd_model_checkpoint", p.message) for p in error.problems]
        return _invalid(renamed) if renamed else A1111Failure(422, error.message, "RequestValidationError")
    return A1111Failure(_status_for(error), error.message, type(error).__name__)


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
            png = await run_in_threadpool(jobs.image_bytes, record.id, image.index)
            images.append(base64.b64encode(png).decode("ascii"))
    body = {"images": images, "parameters": a1111.parameters(params, record),
            "info": a1111.info(record, params, __version__)}
    return JSONResponse(body, headers=headers)


# -- options, listings --------------------------------------------------------------------------------------


@router.get("/options", summary="The API key's A1111 options (`sd_model_checkpoint`: its default model)")
def get_options(jobs: JobServiceDep, redis: RedisDep) -> dict[str, Any]:
    stored = _session(redis, jobs).options()
    model = stored.get("sd_model_checkpoint") or _deployment_model(jobs)
    return {"sd_model_checkpoint": model, "sd_checkpoint_hash": None, "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1, "samples_format": "png", "sd_checkpoints_limit": 1,
            "sd_checkpoints_keep_in_cpu": False, "eta_noise_seed_delta": 0}


@router.post("/options", responses={422: GENERATION_ERRORS[422]}, openapi_extra=OPTIONS_BODY,
             summary="Set the API key's A1111 options (never another key's)")
async def set_options(request: Request, jobs: JobServiceDep, redis: RedisDep) -> Any:
    """``sd_model_checkpoint`` must be a served model; ``sd_vae`` and ``CLIP_stop_at_last_layers`` only at
    the values diffq runs; every other option is accepted and has no effect (Open WebUI posts back all of
    ``GET options``)."""
    try:
        body = _json_object(await request.body())
    except A1111Failure as failure:
        return failure.response()
    return await run_in_threadpool(_set_options, body, jobs, redis)


def _set_options(body: dict[str, Any], jobs: JobService, redis: Any) -> Any:
    problems = a1111.override_problems({k: v for k, v in body.items() if k in a1111.OVERRIDES})
    if "sd_model_checkpoint" in body and not isinstance(body["sd_model_checkpoint"], str):
        problems.append(FieldProblem("sd_model_checkpoint", "must be a model title (GET /sdapi/v1/sd-models)"))
    if problems:
        return _invalid(problems).response()
    title = body.get("sd_model_checkpoint")
    if isinstance(title, str):
        name = a1111.checkpoint_name(title)
        try:
            jobs.served_model(name)
        except UnknownModelError as error:
            return _failure(error).response()
        _session(redis, jobs).set_options({"sd_model_checkpoint": name})
    return None


def _deployment_model(jobs: JobService) -> str | None:
    try:
        return jobs.served_model(None).name
    except UnknownModelError:
        return None


@router.get("/sd-models", response_model=list[SdModel], summary="Served models as A1111 checkpoints")
def sd_models(jobs: JobServiceDep) -> list[dict[str, Any]]:
    names = sorted({entry.model.name for entry in jobs.registry.served_models()})
    return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
            for name in names]


@router.get("/samplers", response_model=list[SamplerItem],
            summary="A1111 sampler names diffq runs (each one of its schedulers)")
def samplers() -> list[dict[str, Any]]:
    return [{"name": s.name, "aliases": [s.scheduler, *s.aliases], "options": {}} for s in a1111.SAMPLERS]


@router.get("/schedulers", response_model=list[ScheduleItem], summary="A1111 noise schedules diffq runs")
def schedulers() -> list[dict[str, Any]]:
    return [{"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name, label in a1111.SCHEDULES]


@router.get("/upscalers", response_model=list[UpscalerItem], summary="Upscalers: only None (diffq has none)")
def upscalers() -> list[dict[str, Any]]:
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


@router.get("/latent-upscale-modes", summary="Latent upscale modes: none")
def latent_upscale_modes() -> list[dict[str, Any]]:
    return []


@router.get("/sd-vae", summary="VAEs: none besides each model's own")
def sd_vae() -> list[dict[str, Any]]:
    return []


@router.get("/loras", summary="LoRAs: none yet")
def loras() -> list[dict[str, Any]]:
    return []


@router.get("/scripts", response_model=ScriptsList, summary="Scripts: none")
def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


# -- progress, interrupt, skip ----------------------------------------------------------------------------


@router.get("/progress", response_model=ProgressAnswer,
            summary="The API key's running /sdapi/v1 job: progress, ETA, a preview")
def progress(jobs: JobServiceDep, redis: RedisDep, skip_current_image: bool = False) -> dict[str, Any]:
    views = _unended(jobs, _session(redis, jobs))
    running = next((v for v in views if v.status is JobStatus.RUNNING), None)
    step, total, fraction, eta, preview = 0, 0, 0.0, 0.0, None
    if running is not None and running.record.progress is not None:
        step, total = running.record.progress.step, running.record.progress.total
        fraction = step / total if total else 0.0
        eta = running.eta_seconds or 0.0
    if running is not None and not skip_current_image:
        try:
            preview = base64.b64encode(jobs.preview(running.record.id)).decode("ascii")
        except DiffqError:
            preview = None
    job = running.record.id if running is not None else ""
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": job,
             "job_count": len(views), "job_timestamp": running.record.created_at.strftime("%Y%m%d%H%M%S")
             if running is not None else "0", "job_no": 0, "sampling_step": step, "sampling_steps": total}
    return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": preview,
            "textinfo": None, "current_task": job or None}


@router.post("/interrupt", summary="Cancel the API key's queued and running /sdapi/v1 jobs")
def interrupt(jobs: JobServiceDep, redis: RedisDep) -> None:
    for view in _unended(jobs, _session(redis, jobs)):
        _cancel(jobs, view.record.id)


@router.post("/skip", summary="Cancel the API key's running /sdapi/v1 jobs (queued ones go on)")
def skip(jobs: JobServiceDep, redis: RedisDep) -> None:
    for view in _unended(jobs, _session(redis, jobs)):
        if view.status is JobStatus.RUNNING:
            _cancel(jobs, view.record.id)


def _unended(jobs: JobService, session: A1111Session) -> list[JobView]:
    """The owner's queued and running /sdapi/v1 jobs, newest first (only its own: ``jobs`` checks)."""
    views = []
    for job_id in session.recent_jobs():
        try:
            view = jobs.get(job_id)
        except JobNotFoundError:
            continue
        if not view.status.is_terminal:
            views.append(view)
    return views


def _cancel(jobs: JobService, job_id: str) -> None:
    try:
        jobs.cancel(job_id)
    except DiffqError:
        pass  # it ended meanwhile

