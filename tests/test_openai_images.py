"""POST /v1/images/generations: the official `openai` client against real `diffq api` and `diffq worker`
processes (tiny model), and the endpoint's timeout and failure answers in process."""

from __future__ import annotations

import base64
import io
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from diffq.app.auth.apikeys import KeyStore
from diffq.app.contract import events, keys
from diffq.app.contract.records import ModelRecord
from diffq.app.contract.store import JobStore
from diffq.app.embedded_redis import EmbeddedRedis
from diffq.app.main import create_app
from diffq.app.settings import Settings
from tests.helpers import wait_for
from tests.services import Services, services

# -- in process: answers that need a job that never ends or that fails (these flush Redis: first) ------


@pytest.fixture
def quick(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"openai_timeout": 0.5}))) as test_client:
        yield test_client


def test_a_job_still_running_after_the_timeout_is_a_504_the_client_does_not_retry(
    quick: TestClient, served: ModelRecord, redis: Redis
) -> None:
    response = quick.post("/v1/images/generations", json={"prompt": "a red circle"})

    assert response.status_code == 504 and response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    job_id = response.headers["x-diffq-job-id"]
    assert error["code"] == "timeout" and f"/v1/jobs/{job_id}" in error["message"]
    assert redis.zcard(keys.owner_jobs("-")) == 1  # the job goes on, findable by the message's URL


def test_a_failed_job_is_a_500_server_error_with_its_code(client: TestClient, redis: Redis,
                                                          served: ModelRecord) -> None:
    test_client = client
    answer: dict = {}
    thread = threading.Thread(target=lambda: answer.update(
        response=test_client.post("/v1/images/generations", json={"prompt": "a red circle"})), daemon=True)
    thread.start()
    job_id = wait_for(lambda: redis.zrange(keys.owner_jobs("-"), 0, 0), timeout=10)[0].decode()
    # What a worker does when the model raises (worker/runner.py: claim, then finish as failed).
    store = JobStore(redis)
    token = uuid.uuid4().hex
    assert store.claim(job_id, "test-worker", token) is not None
    error = {"code": "generation_error", "message": "RuntimeError: CUDA out of memory"}
    store.finish(job_id, token, {"status": "failed", "error": error}, (), job_ttl=60, result_ttl=60)
    events.publish(redis, job_id, "failed", {"status": "failed", "error": error, "images": 0}, 60)
    thread.join(timeout=30)

    response = answer["response"]
    assert response.status_code == 500 and response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["type"] == "server_error"
    assert response.json()["error"]["code"] == "generation_error"
    assert "CUDA out of memory" in response.json()["error"]["message"]


def test_no_live_worker_is_a_503_the_client_may_retry(settings: Settings) -> None:
    with TestClient(create_app(settings)) as test_client:
        response = test_client.post("/v1/images/generations", json={"prompt": "a red circle"})
    assert response.status_code == 503 and response.headers["x-should-retry"] == "true"
    assert response.json()["error"]["code"] == "no_workers"


def test_the_endpoint_is_documented(settings: Settings) -> None:
    with TestClient(create_app(settings)) as test_client:
        schema = test_client.get("/openapi.json").json()
    post = schema["paths"]["/v1/images/generations"]["post"]
    assert set(post["requestBody"]["content"]["application/json"]["schema"]["properties"]) >= {
        "prompt", "n", "size", "response_format", "model"}
    assert {"200", "400", "504"} <= set(post["responses"])


# -- the official openai client against real processes ------------------------------------------------


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Services]:
    """`diffq api` (API keys on, as deployed) and `diffq worker` (tiny model) for the module's last tests:
    no test after them flushes Redis."""
    redis = Redis.from_url(redis_server.url)
    redis.flushall()
    _, token = KeyStore(redis).create("openai-sdk")
    with services(redis_server.url, tmp_path_factory.mktemp("openai"), worker=tiny_model, ready="/readyz",
                  DIFFQ_AUTH="keys") as started:
        started.headers = {"Authorization": f"Bearer {token}"}
        yield started


@pytest.fixture
def oai(stack: Services) -> openai.OpenAI:
    """The official client, with a diffq API key as its api_key (sent as `Authorization: Bearer`)."""
    api_key = stack.headers["Authorization"].removeprefix("Bearer ")
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


@pytest.mark.slow
def test_images_generate_answers_b64_json(oai: openai.OpenAI, stack: Services) -> None:
    raw = oai.images.with_raw_response.generate(
        prompt="a red circle, blue background", n=2, size="16x16", response_format="b64_json",
        model="dall-e-3", quality="hd", style="vivid", user="shop-42",  # OpenAI's knobs: accepted, ignored
        extra_body={"steps": 3, "seed": 11},  # diffq's own parameters ride along
    )
    result = raw.parse()

    assert len(result.data) == 2 and result.created > 0 and result.size == "16x16"
    pngs = [base64.b64decode(image.b64_json) for image in result.data]
    assert [png_size(png) for png in pngs] == [(16, 16), (16, 16)]
    assert all(image.url is None for image in result.data)
    job_id = raw.headers["x-diffq-job-id"]
    job = httpx.get(f"{stack.url}/v1/jobs/{job_id}", headers=stack.headers).json()
    assert job["status"] == "succeeded" and job["seeds"] == [11, 12] and job["request"]["steps"] == 3

    # The worker's log lines about the job are JSON with its id (diffq.app.logs via `diffq worker`).
    lines = [json.loads(line) for line in (stack.log_dir / "worker.log").read_text().splitlines()
             if line.startswith("{")]
    assert any(line.get("job_id") == job_id and "succeeded" in line["message"] for line in lines)


@pytest.mark.slow
def test_images_generate_answers_urls_of_the_same_pixels(oai: openai.OpenAI, stack: Services) -> None:
    request = {"prompt": "a blue square", "size": "16x16", "extra_body": {"steps": 3, "seed": 5}}
    inline = oai.images.generate(response_format="b64_json", **request)
    linked = oai.images.generate(response_format="url", **request)

    [image] = linked.data
    assert image.b64_json is None and image.url.endswith("/images/0.png")
    download = httpx.get(image.url, headers=stack.headers)
    assert download.headers["content-type"] == "image/png"
    assert download.content == base64.b64decode(inline.data[0].b64_json)  # same request and seed: same bytes


@pytest.mark.slow
def test_invalid_requests_raise_the_openai_clients_bad_request_error(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as size:
        oai.images.generate(prompt="a red circle", size="13x7")
    assert size.value.status_code == 400 and size.value.param == "size"
    assert size.value.type == "invalid_request_error"

    with pytest.raises(openai.BadRequestError) as model:
        oai.images.generate(prompt="a red circle", model="sdxl-turbo")
    assert model.value.param == "model" and "served models: tiny" in model.value.message

    with pytest.raises(openai.BadRequestError) as fmt:
        oai.images.generate(prompt="a red circle", response_format="webp")  # type: ignore[arg-type]
    assert fmt.value.param == "response_format" and fmt.value.code == "invalid_value"

    with pytest.raises(openai.BadRequestError) as stream:
        oai.images.generate(prompt="a red circle", stream=True)
    assert stream.value.param == "stream"

    with pytest.raises(openai.BadRequestError) as too_many:
        oai.images.generate(prompt="a red circle", n=50)
    assert too_many.value.param == "n"


@pytest.mark.slow
def test_a_wrong_api_key_is_the_openai_clients_authentication_error(stack: Services) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-not-a-diffq-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as refused:
        client.images.generate(prompt="a red circle", size="16x16")
    assert refused.value.status_code == 401
