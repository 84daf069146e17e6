"""app/api/routes/models.py: only models of live workers, with their limits."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.contract.records import ModelRecord, WorkerRecord, utcnow
from diffq.app.contract.registry import Registry
from diffq.app.settings import Settings


def _worker(worker_id: str, model: ModelRecord) -> WorkerRecord:
    now = utcnow()
    return WorkerRecord(
        id=worker_id, model=model.name, device="cpu", dtype="float32", host="h", pid=1,
        queue=f"diffq:{model.name}", started_at=now, heartbeat_at=now,
    )


def test_lists_the_served_model_with_its_limits(client: TestClient, served: ModelRecord, settings: Settings) -> None:
    [model] = client.get("/v1/models").json()["models"]

    assert model["name"] == served.name
    assert model["schedulers"] == served.schedulers
    assert model["modes"] == ["txt2img", "img2img", "inpaint", "outpaint"]
    assert model["default_steps"] == served.default_steps
    assert (model["min_size"], model["max_size"], model["size_multiple"]) == (
        served.min_size, served.max_size, served.size_multiple,
    )
    assert model["max_steps"] == min(served.max_steps, settings.max_steps)
    assert [w["id"] for w in model["workers"]] == ["test-worker"]


def test_models_of_dead_workers_disappear(client: TestClient, redis: Redis, served: ModelRecord) -> None:
    other = served.model_copy(update={"name": "other"})
    Registry(redis, ttl=1).announce(_worker("short-lived", other), other)
    assert {m["name"] for m in client.get("/v1/models").json()["models"]} == {served.name, "other"}

    time.sleep(1.2)  # its heartbeat TTL passes without renewal

    assert {m["name"] for m in client.get("/v1/models").json()["models"]} == {served.name}


def test_no_workers_no_models(client: TestClient) -> None:
    assert client.get("/v1/models").json() == {"models": []}
