"""Queue-depth backpressure: a full model queue answers 429 queue_full with Retry-After and the
current wait, /readyz?model= tells a load balancer, /metrics gives autoscalers their figure."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.contract import keys
from diffq.app.contract.records import ModelRecord
from diffq.app.core.backpressure import ModelLoad, parse_depths
from diffq.app.main import create_app
from diffq.app.settings import Settings

pytestmark = pytest.mark.usefixtures("served")

BODY = {"prompt": "a red circle"}


@pytest.fixture
def bounded(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"max_queue_depth": "3"}))) as client:
        yield client


def test_past_the_maximum_depth_post_gets_429_queue_full_with_retry_after_and_the_wait(
    bounded: TestClient, redis: Redis, served: ModelRecord
) -> None:
    redis.lpush(keys.model_durations(served.name), "2.0", "4.0")  # recent jobs took 3 s on average
    ids = [bounded.post("/v1/jobs", json=BODY).json()["id"] for _ in range(3)]
    refused = bounded.post("/v1/jobs", json=BODY)
    assert refused.status_code == 429 and refused.json()["code"] == "queue_full"
    assert "3 queued jobs" in refused.json()["message"] and "about 12 s" in refused.json()["message"]  # (3/1+1)*3
    assert refused.headers["Retry-After"] == "4"  # about one job's run: 12 s / 3
    assert redis.llen(f"rq:queue:diffq:{served.name}") == 3, "the refused job was not queued"
    bounded.post(f"/v1/jobs/{ids[0]}/cancel")  # one leaves the queue: room again
    assert bounded.post("/v1/jobs", json=BODY).status_code == 202


def test_an_idempotent_replay_is_answered_even_when_the_queue_is_full(bounded: TestClient) -> None:
    first = bounded.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "k"})
    for _ in range(2):
        bounded.post("/v1/jobs", json=BODY)
    replay = bounded.post("/v1/jobs", json=BODY, headers={"Idempotency-Key": "k"})
    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]


def test_readyz_names_full_queues_and_is_503_for_a_balancer_of_that_model(
    bounded: TestClient, served: ModelRecord
) -> None:
    assert bounded.get("/readyz", params={"model": served.name}).status_code == 200
    for _ in range(3):
        bounded.post("/v1/jobs", json=BODY)
    assert bounded.get("/readyz").json()["queues_full"] == [served.name]
    assert bounded.get("/readyz").status_code == 200  # the service as a whole is ready
    assert bounded.get("/readyz", params={"model": served.name}).status_code == 503


def test_metrics_give_queued_running_workers_and_load_per_worker(
    client: TestClient, redis: Redis, served: ModelRecord
) -> None:
    ids = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(3)]
    redis.zadd(keys.RUNNING, {ids[0]: 1.0})  # as a worker's claim would
    redis.lrem(f"rq:queue:diffq:{served.name}", 1, ids[0])
    text = client.get("/metrics").text

    def gauge(name: str) -> float:
        return float(re.search(rf'^{name}{{model="{served.name}"}} (\S+)$', text, re.M).group(1))

    assert gauge("diffq_queue_depth") == 2 and gauge("diffq_jobs_running") == 1 and gauge("diffq_workers") == 1
    assert gauge("diffq_load_per_worker") == 3.0
    assert re.search(r"^diffq_redis_memory_used_bytes \d", text, re.M)


def test_load_per_worker_counts_no_worker_as_one_so_autoscalers_scale_from_zero() -> None:
    assert ModelLoad(queued=4, running=0, workers=0).per_worker == 4.0
    assert ModelLoad(queued=4, running=2, workers=3).per_worker == 2.0


def test_queue_depths_parse_per_model_with_a_default_and_refuse_nonsense() -> None:
    assert parse_depths("100") == {None: 100}
    assert parse_depths("shapes=10, *=50") == {"shapes": 10, None: 50}
    assert parse_depths("") == {}
    for bad in ("shapes=0", "shapes=many", "-3"):
        with pytest.raises(ValueError, match="positive number"):
            parse_depths(bad)
    with pytest.raises(ValueError, match="max_queue_depth"):
        Settings(_env_file=None, max_queue_depth="shapes=x")
