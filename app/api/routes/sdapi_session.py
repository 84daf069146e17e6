"""``/sdapi/v1`` beside generation: per-key options, the listings A1111 clients read, and the caller's
jobs (``progress``, ``interrupt``, ``skip``).

Options and jobs are per API key (``diffq.app.core.a1111_session``): ``sd_model_checkpoint`` is that key's
default model, and ``progress``/``interrupt``/``skip`` see only that key's ``/sdapi/v1`` jobs, never
another key's and never its own ``/v1/jobs`` work.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from diffq.app.api.a1111_errors import ERRORS, A1111Failure, failure, invalid, json_object
from diffq.app.api.routes.sdapi import session_of
from diffq.app.contract.adapters import SUFFIX, list_adapters
from diffq.app.contract.status import JobStatus
from diffq.app.core import a1111
from diffq.app.core.a1111_session import A1111Session
from diffq.app.core.errors import DiffqError, FieldProblem, JobNotFoundError, UnknownModelError
from diffq.app.core.jobs import JobService, JobView
from diffq.app.deps import JobServiceDep, RedisDep, SettingsDep
from diffq.app.schemas.a1111 import ProgressAnswer, SamplerItem, ScheduleItem, ScriptsList, SdModel, UpscalerItem

router = APIRouter(prefix="/sdapi/v1", tags=["automatic1111"])

OPTIONS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": {"sd_model_checkpoint": {"type": "string"}}}
            }
        },
    }
}


# -- options, listings --------------------------------------------------------------------------------------


@router.get("/options", summary="The API key's A1111 options (`sd_model_checkpoint`: its default model)")
def get_options(jobs: JobServiceDep, redis: RedisDep) -> dict[str, Any]:
    stored = session_of(redis, jobs).options()
    model = stored.get("sd_model_checkpoint") or _deployment_model(jobs)
    return {
        "sd_model_checkpoint": model,
        "sd_checkpoint_hash": None,
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "sd_checkpoints_limit": 1,
        "sd_checkpoints_keep_in_cpu": False,
        "eta_noise_seed_delta": 0,
    }


@router.post(
    "/options",
    responses={422: ERRORS[422]},
    openapi_extra=OPTIONS_BODY,
    summary="Set the API key's A1111 options (never another key's)",
)
async def set_options(request: Request, jobs: JobServiceDep, redis: RedisDep) -> Any:
    """``sd_model_checkpoint`` must be a served model; ``sd_vae`` and ``CLIP_stop_at_last_layers`` only at
    the values diffq runs; every other option is accepted and has no effect (Open WebUI posts back all of
    ``GET options``)."""
    try:
        body = json_object(await request.body())
    except A1111Failure as refused:
        return refused.response()
    return await run_in_threadpool(_set_options, body, jobs, redis)


def _set_options(body: dict[str, Any], jobs: JobService, redis: Any) -> Any:
    problems = a1111.override_problems({k: v for k, v in body.items() if k in a1111.OVERRIDES})
    if "sd_model_checkpoint" in body and not isinstance(body["sd_model_checkpoint"], str):
        problems.append(FieldProblem("sd_model_checkpoint", "must be a model title (GET /sdapi/v1/sd-models)"))
    if problems:
        return invalid(problems).response()
    title = body.get("sd_model_checkpoint")
    if isinstance(title, str):
        name = a1111.checkpoint_name(title)
        try:
            jobs.served_model(name)
        except UnknownModelError as error:
            return failure(error).response()
        session_of(redis, jobs).set_options({"sd_model_checkpoint": name})
    return None


def _deployment_model(jobs: JobService) -> str | None:
    try:
        return jobs.served_model(None).name
    except UnknownModelError:
        return None


@router.get("/sd-models", response_model=list[SdModel], summary="Served models as A1111 checkpoints")
def sd_models(jobs: JobServiceDep) -> list[dict[str, Any]]:
    names = sorted({entry.model.name for entry in jobs.registry.served_models()})
    return [
        {"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
        for name in names
    ]


@router.get(
    "/samplers", response_model=list[SamplerItem], summary="A1111 sampler names diffq runs (each one of its schedulers)"
)
def samplers() -> list[dict[str, Any]]:
    return [{"name": s.name, "aliases": [s.scheduler, *s.aliases], "options": {}} for s in a1111.SAMPLERS]


@router.get("/schedulers", response_model=list[ScheduleItem], summary="A1111 noise schedules diffq runs")
def schedulers() -> list[dict[str, Any]]:
    return [
        {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
        for name, label in a1111.SCHEDULES
    ]


@router.get("/upscalers", response_model=list[UpscalerItem], summary="Upscalers: only None (diffq has none)")
def upscalers() -> list[dict[str, Any]]:
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


@router.get("/latent-upscale-modes", summary="Latent upscale modes: none")
def latent_upscale_modes() -> list[dict[str, Any]]:
    return []


@router.get("/sd-vae", summary="VAEs: none besides each model's own")
def sd_vae() -> list[dict[str, Any]]:
    return []


@router.get("/loras", summary="LoRAs: the adapters of DIFFQ_LORA_DIR (use them as <lora:name:weight> in the prompt)")
def loras(settings: SettingsDep) -> list[dict[str, Any]]:
    """A1111's listing shape: name, alias, path (the file's name only: no server path is disclosed), metadata."""
    return [
        {
            "name": adapter.name,
            "alias": adapter.name,
            "path": f"{adapter.name}{SUFFIX}",
            "metadata": {
                "ss_base_model_version": adapter.base_model,
                "sha256": adapter.sha256,
                "size_bytes": adapter.size_bytes,
            },
        }
        for adapter in list_adapters(settings.lora_dir)
    ]


@router.get("/scripts", response_model=ScriptsList, summary="Scripts: none")
def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


# -- progress, interrupt, skip ----------------------------------------------------------------------------


@router.get(
    "/progress", response_model=ProgressAnswer, summary="The API key's running /sdapi/v1 job: progress, ETA, a preview"
)
def progress(jobs: JobServiceDep, redis: RedisDep, skip_current_image: bool = False) -> dict[str, Any]:
    views = _unended(jobs, session_of(redis, jobs))
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
    state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": job,
        "job_count": len(views),
        "job_timestamp": running.record.created_at.strftime("%Y%m%d%H%M%S") if running is not None else "0",
        "job_no": 0,
        "sampling_step": step,
        "sampling_steps": total,
    }
    return {
        "progress": fraction,
        "eta_relative": eta,
        "state": state,
        "current_image": preview,
        "textinfo": None,
        "current_task": job or None,
    }


@router.post("/interrupt", summary="Cancel the API key's queued and running /sdapi/v1 jobs")
def interrupt(jobs: JobServiceDep, redis: RedisDep) -> None:
    for view in _unended(jobs, session_of(redis, jobs)):
        _cancel(jobs, view.record.id)


@router.post("/skip", summary="Cancel the API key's running /sdapi/v1 jobs (queued ones go on)")
def skip(jobs: JobServiceDep, redis: RedisDep) -> None:
    for view in _unended(jobs, session_of(redis, jobs)):
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
