"""Builds the FastAPI app: ``uvicorn --factory diffq.app.main:create_app`` or ``diffq api``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from redis import Redis
from redis import exceptions as redis_errors

from diffq.app import __version__
from diffq.app.api.decode_gate import DecodeGate
from diffq.app.api.errors import KEYED_RESPONSES, install_error_handlers
from diffq.app.api.headers import SecurityHeaders
from diffq.app.api.limits import BodySizeLimit
from diffq.app.api.metrics import DiffqCollector
from diffq.app.api.openapi import build_openapi
from diffq.app.api.polling import PollPacer
from diffq.app.api.redis_clients import open_api_redis
from diffq.app.api.routes import (
    batches,
    health,
    images,
    jobs,
    loras,
    metrics,
    models,
    openai_edits,
    openai_images,
    playground,
    sdapi,
    sdapi_session,
    verify,
)
from diffq.app.api.slow_clients import BodyDeadline
from diffq.app.api.waiting import Waiter
from diffq.app.api.waits import WaitCount
from diffq.app.auth.apikeys import VerifiedKeys
from diffq.app.auth.quotas import RateLimiter
from diffq.app.contract import memory
from diffq.app.deps import get_caller
from diffq.app.logs import JobContextMiddleware
from diffq.app.settings import Settings, load_settings
from diffq.app.storage.factory import ready_store

log = logging.getLogger(__name__)

#: Seconds a verified API key is remembered by an API process (``diffq.app.auth.apikeys.VerifiedKeys``).
KEY_CACHE_SECONDS = 60.0

DESCRIPTION = """\
Text-to-image and image-editing jobs (img2img, inpainting, outpainting) on latent
diffusion models. `POST /v1/jobs` (JSON, or multipart/form-data with image files)
queues a job and answers `202` with its URL; poll `GET /v1/jobs/{id}` until
`status` is `succeeded`, then download `images[n].url`.
"""


def _check_memory_policy(redis: Redis, settings: Settings) -> None:
    """Refuse to start on a Redis that may evict jobs (``EvictionPolicyError``); one that is
    down now is checked by the workers, which cannot start without it."""
    try:
        memory.check_policy(redis, settings.redis_allow_eviction)
    except (redis_errors.ConnectionError, redis_errors.TimeoutError) as error:
        log.warning("could not read Redis's maxmemory-policy at start (%s); the workers check it", error)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API; ``settings`` defaults to the environment's ``DIFFQ_*`` variables."""
    settings = settings if settings is not None else load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Connections are opened lazily by the pools, so the API starts even while
        # Redis is down; /readyz says so and requests get 503 until it is back.
        clients = open_api_redis(settings)
        app.state.redis = clients.sync  # thread-pool routes and dependencies
        app.state.quick = clients.quick  # the hot paths on the event loop: key check and rate, submit, poll
        # Long polls, event streams and synchronous endpoints block on Redis: asyncio clients, so
        # they hold no thread; blocking reads have their own pool (diffq.app.api.redis_clients), admitted
        # by diffq.app.api.waits. Routes reach it only through diffq.app.deps.WaiterDep.
        app.state.waiter = Waiter(
            clients.sync, clients.quick, clients.waits, WaitCount(settings.redis_wait_connections)
        )
        app.state.decode_gate = DecodeGate(settings.decode_concurrency, settings.decode_concurrency_per_key)
        app.state.rate_limiter = RateLimiter(app.state.redis, clients.quick)
        app.state.verified_keys = VerifiedKeys(KEY_CACHE_SECONDS)  # revocation is checked with the rate
        app.state.poll_pacer = PollPacer(settings.poll_interval, settings.poll_burst)  # tight polling loops
        _check_memory_policy(app.state.redis, settings)
        # The result store: an API that cannot write to it refuses to start (the message names the setting).
        app.state.results = ready_store(settings, app.state.redis)
        try:
            yield
        finally:
            await clients.aclose()

    app = FastAPI(title="diffq", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    # Everything under /v1 needs an API key (unless DIFFQ_AUTH=off): get_caller checks it and its rate.
    keyed: dict[str, Any] = {"dependencies": [Depends(get_caller)], "responses": KEYED_RESPONSES}
    for module in (jobs, images, models, verify, loras):
        app.include_router(module.router, **keyed)
    app.include_router(batches.router, **keyed)  # many jobs in one request (diffq.app.core.batches)
    app.include_router(health.router)
    # Where users already are: OpenAI's Images API, Prometheus, a browser page; job ids on log lines.
    app.include_router(openai_images.router, **keyed)
    app.include_router(openai_edits.router, **keyed)
    app.include_router(sdapi.router, **keyed)  # AUTOMATIC1111's API: its clients send HTTP Basic
    app.include_router(sdapi_session.router, **keyed)
    app.include_router(metrics.router)
    app.include_router(playground.router)
    app.mount("/static", StaticFiles(directory=playground.STATIC, check_dir=False), name="static")
    collector = DiffqCollector(lambda: app.state.redis, settings.heartbeat_ttl)
    app.state.metrics_registry = metrics.metrics_registry(collector)
    app.add_middleware(JobContextMiddleware)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyDeadline, timeout=settings.http_body_timeout)  # outermost: the first to receive
    app.openapi = partial(build_openapi, app, settings)  # type: ignore[method-assign]
    return app
