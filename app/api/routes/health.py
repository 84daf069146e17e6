"""Probes: ``/healthz`` (the process answers) and ``/readyz`` (it can serve jobs)."""

from __future__ import annotations

from typing import Annotated

import redis.exceptions
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from redis import Redis

from diffq.app import __version__
from diffq.app.core import backpressure
from diffq.app.deps import RegistryDep, ResultsDep, SettingsDep
from diffq.app.schemas.health import Health, Readiness
from diffq.app.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health(version=__version__)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {
            "model": Readiness,
            "description": ("Redis or the result store unreachable, no live worker, or the queue of `model` is full."),
        }
    },
    summary="Readiness",
)
def readyz(
    registry: RegistryDep,
    results: ResultsDep,
    settings: SettingsDep,
    model: Annotated[
        str | None,
        Query(
            description="Also not ready (503) while this model's queue is full: for a load "
            "balancer in front of one model's traffic."
        ),
    ] = None,
) -> JSONResponse:
    try:
        registry.redis.ping()
        served = registry.served_models()
        full = [s.model.name for s in served if _full(registry.redis, settings, s.model.name)]
        reachable = True
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        served, full, reachable = [], [], False
    workers = sum(len(s.workers) for s in served)
    store = results.ping()
    body = Readiness(
        ready=reachable and workers > 0 and store and (model is None or model not in full),
        redis=reachable,
        store=store,
        store_backend=results.name,
        workers=workers,
        models=[s.model.name for s in served],
        queues_full=full,
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


def _full(redis: Redis, settings: Settings, model: str) -> bool:
    limit = backpressure.max_depth(settings, model)
    return limit is not None and backpressure.queued(redis, model) >= limit
