"""Builds the FastAPI app: ``uvicorn --factory app.main:create_app`` or ``diffq api``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from app import __version__
from app.api.errors import KEYED_RESPONSES, install_error_handlers
from app.api.limits import BodySizeLimit
from app.api.openapi import build_openapi
from app.api.metrics import DiffqCollector
from app.api.routes import health, images, jobs, loras, metrics, models, openai_images, playground
from app.auth.quotas import RateLimiter
from app.deps import get_caller
from app.logs import JobContextMiddleware
from app.settings import Settings, load_settings

DESCRIPTION = """\
Text-to-image and image-editing jobs (img2img, inpainting, outpainting) on latent
diffusion models. `POST /v1/jobs` (JSON, or multipart/form-data with image files)
queues a job and answers `202` with its URL; poll `GET /v1/jobs/{id}` until
`status` is `succeeded`, then download `images[n].url`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API; ``settings`` defaults to the environment's ``DIFFQ_*`` variables."""
    settings = settings if settings is not None else load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Connections are opened lazily by the pool, so the API starts even while
        # Redis is down; /readyz says so and requests get 503 until it is back.
        app.state.redis = Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=10)
        # Event streams and long polls block on Redis: an asyncio client, so they hold no thread.
        # Its socket timeout must outlast the blocking reads (5 s XREAD; redis-py's default is 5 s too).
        app.state.aredis = AsyncRedis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=30)
        app.state.rate_limiter = RateLimiter(app.state.redis)
        try:
            yield
        finally:
            app.state.redis.close()
            await app.state.aredis.aclose()

    app = FastAPI(title="diffq", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    # Everything under /v1 needs an API key (unless DIFFQ_AUTH=off): get_caller checks it and its rate.
    keyed = {"dependencies": [Depends(get_caller)], "responses": KEYED_RESPONSES}
    for module in (jobs, images, models, loras):
        app.include_router(module.router, **keyed)
    app.include_router(health.router)
    # Where users already are: OpenAI's Images API, Prometheus, a browser page; job ids on log lines.
    app.include_router(openai_images.router, **keyed)
    app.include_router(metrics.router)
    app.include_router(playground.router)
    app.mount("/static", StaticFiles(directory=playground.STATIC, check_dir=False), name="static")
    app.state.metrics_registry = metrics.metrics_registry(DiffqCollector(lambda: app.state.redis, settings.heartbeat_ttl))
    app.add_middleware(JobContextMiddleware)
    app.openapi = partial(build_openapi, app, settings)  # type: ignore[method-assign]
    return app
