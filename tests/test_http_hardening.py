"""The smaller holes of issue 19, against the real app and a real Redis: 415 for bodies that are
neither JSON nor multipart, strict JSON types on /v1/jobs, security headers, public URLs from
DIFFQ_PUBLIC_URL, Idempotency-Keys kept apart per endpoint, and an exhausted Redis pool answered
as such (never "Redis is unreachable")."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from diffq.app.api.redis_clients import open_api_redis
from diffq.app.main import create_app
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB

pytestmark = pytest.mark.usefixtures("served")

BODY = json.dumps(TINY_JOB).encode()


@pytest.fixture
def impatient(settings: Settings) -> Iterator[TestClient]:
    """The app with a short OpenAI-endpoint wait (no worker runs here)."""
    with TestClient(create_app(settings.model_copy(update={"openai_timeout": 0.2}))) as client:
        yield client


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml",
                                          None, "TEXT/PLAIN;charset=utf-8", "multipart/mixed; boundary=x"])
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/images/generations"])
def test_bodies_that_are_neither_json_nor_multipart_get_415(impatient: TestClient, redis, path: str,
                                                             content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = impatient.post(path, content=BODY, headers=headers)
    assert response.status_code == 415, response.text
    text = response.text
    assert "application/json" in text
    assert not redis.keys("diffq:job:*")  # nothing queued


def test_json_and_multipart_are_accepted_whatever_their_case(client: TestClient) -> None:
    as_json = client.post("/v1/jobs", content=BODY, headers={"Content-Type": "Application/JSON; charset=UTF-8"})
    assert as_json.status_code == 202, as_json.text
    boundary = "XyZ"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na red circle\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"steps\"\r\n\r\n2\r\n--{boundary}--\r\n").encode()
    upper = client.post("/v1/jobs", content=form, headers={"Content-Type": f"MULTIPART/FORM-DATA; boundary={boundary}"})
    assert upper.status_code == 202, upper.text
    assert upper.json()["request"]["steps"] == 2  # multipart fields are text: "2" is read as 2


@pytest.mark.parametrize(("field", "value"), [("steps", True), ("metadata", "no"), ("steps", "2"), ("seed", 1.5),
                                              ("num_images", False), ("journey", 1), ("resize", "true")])
def test_json_types_are_not_coerced(client: TestClient, field: str, value: object) -> None:
    response = client.post("/v1/jobs", json={**TINY_JOB, field: value})
    assert response.status_code == 422, response.text
    assert response.json()["fields"][0]["field"] == field


def test_security_headers_fit_what_is_served(client: TestClient) -> None:
    api = client.get("/healthz")
    page = client.get("/")
    docs = client.get("/docs")
    for response in (api, page, docs, client.get("/v1/jobs/nope")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["x-frame-options"] == "DENY"
    assert api.headers["content-security-policy"].startswith("default-src 'none'")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert "'unsafe-inline'" not in page.headers["content-security-policy"]


@pytest.fixture
def public(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"public_url": "https://api.example.com/"}))) as client:
        yield client


def test_public_urls_come_from_the_configured_base_not_the_host_header(public: TestClient) -> None:
    response = public.post("/v1/jobs", json=TINY_JOB, headers={"Host": "evil.example"})
    assert response.status_code == 202
    job_id = response.json()["id"]
    assert response.headers["location"] == f"https://api.example.com/v1/jobs/{job_id}"
    assert "evil" not in public.get(f"/v1/jobs/{job_id}", headers={"Host": "evil.example"}).text


def test_idempotency_keys_of_different_endpoints_are_kept_apart(impatient: TestClient) -> None:
    key = {"Idempotency-Key": "same-key-1"}
    job = impatient.post("/v1/jobs", json=TINY_JOB, headers=key)
    images = impatient.post("/v1/images/generations", json={"prompt": "a blue square", "size": "16x16"}, headers=key)
    assert job.status_code == 202
    assert images.status_code == 504, images.text  # its own job, still queued (no worker): not a 409
    assert images.headers["x-diffq-job-id"] != job.json()["id"]
    again = impatient.post("/v1/jobs", json=TINY_JOB, headers=key)
    assert again.headers.get("idempotent-replayed") == "true" and again.json()["id"] == job.json()["id"]


def test_an_exhausted_pool_is_store_busy_not_redis_unreachable(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"redis_max_connections": 1}))) as client:
        # The thread pool's client (cancel runs there; a GET reads through the event loop's own client).
        pool = client.app.state.redis.connection_pool
        held = pool.get_connection()  # the pool's only connection, in use elsewhere
        try:
            response = client.post("/v1/jobs/" + "a" * 32 + "/cancel")
        finally:
            pool.release(held)
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "store_busy"
        assert "unreachable" not in response.text and "DIFFQ_REDIS_MAX_CONNECTIONS" in response.text
        assert client.post("/v1/jobs/" + "a" * 32 + "/cancel").status_code == 404  # fine once a connection is free


def test_the_event_loops_client_waits_for_a_connection_rather_than_failing(settings: Settings) -> None:
    # Hot paths (key check, submit, poll) use the asyncio client; with no thread pool to bound them, more
    # commands than connections may be in flight at once: they wait their turn, as threads would.
    clients = open_api_redis(settings.model_copy(update={"redis_max_connections": 2}))

    async def many() -> list[object]:
        try:
            return await asyncio.gather(*(clients.quick.ping() for _ in range(20)))
        finally:
            await clients.aclose()

    assert asyncio.run(many()) == [True] * 20
