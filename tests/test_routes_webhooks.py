"""Webhooks on jobs: the `webhook` field of POST /v1/jobs, events.publish scheduling deliveries,
a real in-process worker and deliverer, a real HTTP receiver that verifies the signature, and
the delivery attempts on the job resource."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import standardwebhooks
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from diffq.app.contract import events, keys
from diffq.app.contract.records import JobParams, JobRecord, ModelRecord, Webhook
from diffq.app.contract.store import JobStore
from diffq.app.main import create_app
from diffq.app.settings import Settings
from diffq.app.webhooks.deliver import Deliverer, attempts, attempts_key
from diffq.app.contract.webhook_queue import DUE, delivery_key
from diffq.app.webhooks.signing import get_secret
from tests.helpers import TINY_JOB, work
from tests.test_webhooks import Receiver

TERMINAL = ["succeeded", "failed", "canceled"]


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"webhook_allow_loopback": True, "webhook_timeout": 5.0})


@pytest.fixture
def hook_client(hook_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(hook_settings)) as test_client:
        yield test_client


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


def deliver_all(redis: Redis, settings: Settings) -> int:
    """One pass of a real deliverer, in this process."""
    deliverer = Deliverer(redis, settings)
    try:
        return deliverer.run_once()
    finally:
        deliverer.close()


def scheduled(redis: Redis) -> list[dict]:
    """The pending deliveries, oldest first."""
    ids = [i.decode() for i in redis.zrange(DUE, 0, -1)]
    return [json.loads(redis.get(delivery_key(i))) for i in ids]


# The request field ------------------------------------------------------------------------------


def test_a_loopback_webhook_is_refused_by_default(client: TestClient, served: ModelRecord, redis: Redis) -> None:
    response = client.post("/v1/jobs", json={**TINY_JOB, "webhook": {"url": "http://127.0.0.1:9/hook"}})

    assert response.status_code == 422, response.text
    error = response.json()
    assert error["code"] == "invalid_request"
    assert [f["field"] for f in error["fields"]] == ["webhook.url"]
    assert "loopback" in error["fields"][0]["message"]
    assert not redis.keys(f"{keys.PREFIX}:job:*") and redis.zcard(DUE) == 0


@pytest.mark.parametrize(
    ("webhook", "field"),
    [
        ({"url": "http://169.254.169.254/latest/meta-data/"}, "webhook.url"),
        ({"url": "ftp://example.com/hook"}, "webhook.url"),
        ({"url": "http://127.0.0.1/hook", "events": ["progress"]}, "webhook.events.0"),
        ({"url": "http://127.0.0.1/hook", "events": []}, "webhook.events"),
        ({"url": "http://127.0.0.1/hook", "secret": "x"}, "webhook.secret"),
        ({"events": ["succeeded"]}, "webhook.url"),
    ],
)
def test_bad_webhooks_are_422_naming_the_field(
    hook_client: TestClient, served: ModelRecord, webhook: dict, field: str
) -> None:
    response = hook_client.post("/v1/jobs", json={**TINY_JOB, "webhook": webhook})

    assert response.status_code == 422, response.text
    assert field in [f["field"] for f in response.json()["fields"]]


def test_an_allowed_webhook_is_stored_in_the_request_and_shown_on_the_job(
    hook_client: TestClient, served: ModelRecord, redis: Redis, receiver: Receiver
) -> None:
    response = hook_client.post("/v1/jobs", json={**TINY_JOB, "webhook": {"url": receiver.url}})

    assert response.status_code == 202, response.text
    job = response.json()
    assert job["request"]["webhook"] == {"url": receiver.url, "events": TERMINAL}
    assert job["webhook"] == {"url": receiver.url, "events": TERMINAL, "deliveries": []}
    stored = JobStore(redis).get(job["id"])
    assert stored is not None and stored.request.webhook == Webhook(url=receiver.url)
    assert redis.zcard(DUE) == 0  # "queued" is not among the default events


def test_a_job_without_a_webhook_has_none(client: TestClient, served: ModelRecord, redis: Redis) -> None:
    job = client.post("/v1/jobs", json=TINY_JOB).json()

    assert job["webhook"] is None and job["request"]["webhook"] is None
    assert client.get(f"/v1/jobs/{job['id']}").json()["webhook"] is None


def test_multipart_takes_the_webhook_as_a_json_string(
    hook_client: TestClient, served: ModelRecord, receiver: Receiver
) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (served.default_width, served.default_height), "red").save(buffer, format="PNG")
    hook = json.dumps({"url": receiver.url, "events": ["queued", "succeeded"]})
    form = {"prompt": "a red circle", "steps": "2", "webhook": hook}

    files = {"image": ("in.png", buffer.getvalue(), "image/png")}
    response = hook_client.post("/v1/jobs", data=form, files=files)
    assert response.status_code == 202, response.text
    assert response.json()["webhook"]["events"] == ["queued", "succeeded"]
    assert response.json()["request"]["mode"] == "img2img"

    bad = hook_client.post("/v1/jobs", data={**form, "webhook": "{not json"}, files=files)
    assert bad.status_code == 422 and [f["field"] for f in bad.json()["fields"]] == ["webhook"]


def test_the_openapi_schema_documents_the_webhook_and_the_deliveries(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    schemas = schema["components"]["schemas"]
    assert schemas["JobCreate"]["properties"]["webhook"]
    assert set(schemas["Webhook"]["properties"]) == {"url", "events"}
    assert "deliveries" in schemas["WebhookPublic"]["properties"]
    assert schemas["JobCreateMultipart"]["properties"]["webhook"]["type"] == "string"


# Events become deliveries --------------------------------------------------------------------------


def test_publish_schedules_status_events_the_webhook_asks_for(redis: Redis) -> None:
    params = JobParams(prompt="p", width=64, height=64, steps=2, guidance_scale=7.5, scheduler="ddim", seed=1,
                       webhook=Webhook(url="http://127.0.0.1/hook", events=["running", "failed"]))
    JobStore(redis).create(JobRecord(id="j1", model="m", request=params), ttl=100)
    error = {"code": "generation_error", "message": "boom"}

    events.publish(redis, "j1", "running", {"attempt": 1}, 100)
    events.publish(redis, "j1", "progress", {"step": 1, "total": 2}, 100)  # never a webhook
    events.publish(redis, "j1", "preview", {"step": 1, "total": 2}, 100)
    events.publish(redis, "j1", "failed", {"status": "failed", "error": error, "images": 0}, 100)
    events.publish(redis, "j2", "failed", {"status": "failed", "images": 0}, 100)  # no record: no webhook

    running, failed = scheduled(redis)
    assert [e.type for e in events.read(redis, "j1")] == ["running", "progress", "preview", "failed"]
    assert (running["type"], running["event_id"], running["url"]) == ("job.running", "msg_j1_running_1",
                                                                        "http://127.0.0.1/hook")
    assert running["payload"]["data"] == {"id": "j1", "url": "/v1/jobs/j1", "status": "running", "attempt": 1}
    assert (failed["type"], failed["event_id"]) == ("job.failed", "msg_j1_failed")
    assert failed["payload"]["data"] == {"id": "j1", "url": "/v1/jobs/j1", "status": "failed", "error": error,
                                         "images": []}


def test_publish_in_a_pipeline_uses_the_callers_webhook_without_a_lookup(redis: Redis) -> None:
    hook = Webhook(url="http://127.0.0.1/hook", events=["queued"])
    with redis.pipeline() as pipe:
        events.publish(pipe, "j1", "queued", {"status": "queued"}, 100)  # no record, no spec: nothing
        events.publish(pipe, "j2", "queued", {"status": "queued"}, 100, webhook=hook)
        events.publish(pipe, "j3", "succeeded", {"status": "succeeded", "images": 2}, 100,
                       webhook=hook.model_dump())  # a spec as stored JSON; not among its events
        pipe.execute()

    [queued] = scheduled(redis)
    assert queued["job_id"] == "j2" and queued["payload"]["type"] == "job.queued"
    assert len(events.read(redis, "j3")) == 1


# A real job, worker and deliverer ---------------------------------------------------------------


def test_a_finished_job_sends_a_signed_webhook_listed_on_the_job(
    hook_client: TestClient, hook_settings: Settings, served: ModelRecord, engine: object, redis: Redis,
    receiver: Receiver,
) -> None:
    job = hook_client.post("/v1/jobs", json={**TINY_JOB, "num_images": 2, "webhook": {"url": receiver.url}}).json()

    assert work(hook_settings, engine)
    assert deliver_all(redis, hook_settings) == 1

    (path, headers, body), = receiver.requests
    payload = standardwebhooks.Webhook(get_secret(redis, hook_settings)).verify(body, headers)
    assert path == "/hook?token=abc"
    assert payload["type"] == "job.succeeded" and headers["webhook-id"] == f"msg_{job['id']}_succeeded"
    expires_at = payload["data"].pop("expires_at")  # when the job and its images go (its retention)
    assert payload["data"] == {
        "id": job["id"], "url": f"/v1/jobs/{job['id']}", "status": "succeeded", "error": None, "seeds": [7, 8],
        "images": [f"/v1/jobs/{job['id']}/images/0.png", f"/v1/jobs/{job['id']}/images/1.png"],
    }
    assert abs(datetime.fromisoformat(expires_at) - datetime.fromisoformat(
        hook_client.get(f"/v1/jobs/{job['id']}").json()["expires_at"])) < timedelta(seconds=5)
    assert hook_client.get(payload["data"]["images"][1]).headers["content-type"] == "image/png"

    shown = hook_client.get(f"/v1/jobs/{job['id']}").json()
    assert shown["status"] == "succeeded"
    [delivery] = shown["webhook"]["deliveries"]
    assert delivery["type"] == "job.succeeded" and delivery["event_id"] == headers["webhook-id"]
    assert (delivery["attempt"], delivery["status_code"], delivery["outcome"]) == (1, 200, "delivered")
    assert delivery["error"] is None and delivery["next_attempt_at"] is None
    assert deliver_all(redis, hook_settings) == 0  # nothing left to send


def test_every_status_event_asked_for_is_delivered_in_order(
    hook_client: TestClient, hook_settings: Settings, served: ModelRecord, engine: object, redis: Redis,
    receiver: Receiver,
) -> None:
    hook = {"url": receiver.url, "events": ["queued", "running", "succeeded", "failed", "canceled"]}
    job = hook_client.post("/v1/jobs", json={**TINY_JOB, "webhook": hook}).json()
    assert work(hook_settings, engine)
    while deliver_all(redis, hook_settings):
        pass

    types = [json.loads(body)["type"] for _, _, body in receiver.requests]
    assert sorted(types) == ["job.queued", "job.running", "job.succeeded"]  # no progress, no previews
    ids = {headers["webhook-id"] for _, headers, _ in receiver.requests}
    assert ids == {f"msg_{job['id']}_queued", f"msg_{job['id']}_running_1", f"msg_{job['id']}_succeeded"}
    assert [d["outcome"] for d in hook_client.get(f"/v1/jobs/{job['id']}").json()["webhook"]["deliveries"]] == [
        "delivered"
    ] * 3


def test_canceling_a_queued_job_sends_job_canceled(
    hook_client: TestClient, hook_settings: Settings, served: ModelRecord, redis: Redis, receiver: Receiver
) -> None:
    job = hook_client.post("/v1/jobs", json={**TINY_JOB, "webhook": {"url": receiver.url}}).json()
    assert hook_client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"

    assert deliver_all(redis, hook_settings) == 1
    (_, _, body), = receiver.requests
    assert json.loads(body)["data"] == {"id": job["id"], "url": f"/v1/jobs/{job['id']}", "status": "canceled",
                                        "error": None, "images": []}


def test_a_failing_receiver_shows_retries_on_the_job_and_delete_removes_them(
    hook_client: TestClient, hook_settings: Settings, served: ModelRecord, redis: Redis, receiver: Receiver
) -> None:
    job = hook_client.post("/v1/jobs", json={**TINY_JOB, "webhook": {"url": receiver.url}}).json()
    hook_client.post(f"/v1/jobs/{job['id']}/cancel")
    receiver.answer(503)

    assert deliver_all(redis, hook_settings) == 1
    [attempt] = hook_client.get(f"/v1/jobs/{job['id']}").json()["webhook"]["deliveries"]
    assert (attempt["status_code"], attempt["outcome"], attempt["error"]) == (503, "retrying", "HTTP 503")
    assert attempt["next_attempt_at"] is not None

    assert hook_client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not redis.exists(attempts_key(job["id"])) and attempts(redis, job["id"]) == []
