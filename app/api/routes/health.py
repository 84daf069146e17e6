"""Probes: ``/healthz`` (the process answers) and ``/readyz`` (it can serve jobs)."""

from __future__ import annotations

import redis.exceptions
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app import __version__
from app.deps import RegistryDep, ResultsDep
from app.schemas.health import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    return Health(version=__version__)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis or the result store unreachable, or no live worker."}},
    summary="Readiness",
)
def readyz(registry: RegistryDep, results: ResultsDep) -> JSONResponse:
    try:
        registry.redis.ping()
        served = registry.served_models()
        reachable = True
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        served, reachable = [], False
    workers = sum(len(s.workers) for s in served)
    store = results.ping()
    body = Readiness(
        ready=reachable and workers > 0 and store,
        redis=reachable,
        store=store,
        store_backend=results.name,
        workers=workers,
        models=[s.model.name for s in served],
    )
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)
