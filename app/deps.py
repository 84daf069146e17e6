"""Shared FastAPI dependencies as ``Annotated`` aliases; tests swap them with ``dependency_overrides``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from redis import Redis

from app.contract.registry import Registry
from app.core.jobs import JobService
from app.schemas.jobs import JobCreate, job_create_model
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    """The app's settings (given to ``create_app``); override this in tests to change limits."""
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_redis(request: Request) -> Redis:
    """The Redis client opened in the app's lifespan."""
    return request.app.state.redis


RedisDep = Annotated[Redis, Depends(get_redis)]


def get_job_service(redis: RedisDep, settings: SettingsDep) -> JobService:
    return JobService(redis, settings)


JobServiceDep = Annotated[JobService, Depends(get_job_service)]


def get_registry(redis: RedisDep, settings: SettingsDep) -> Registry:
    return Registry(redis, settings.heartbeat_ttl)


RegistryDep = Annotated[Registry, Depends(get_registry)]


async def read_job_create(request: Request, settings: SettingsDep) -> JobCreate:
    """Parse the POST body with the limits of the current settings (not the import-time ones)."""
    raw = await request.body()
    try:
        return job_create_model(settings).model_validate_json(raw)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


JobCreateBody = Annotated[JobCreate, Depends(read_job_create)]
