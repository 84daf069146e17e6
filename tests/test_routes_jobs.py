"""app/api/routes/jobs.py: POST/GET/DELETE /v1/jobs against a real Redis and a real worker."""

from __future__ import annotations

import json
import zlib

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from app.contract import keys
from app.contract.records import ModelRecord
from app.contract.tasks import model_queue
from app.settings import Settings
from tests.helpers import TINY_JOB, work

pytestmark = pytest.mark.usefixtures("served")


def test_post_answers_202_with_location_and_the_queued_job(client: TestClient, served: ModelRecord) -> None:
    response = client.post("/v1/jobs", json=TINY_JOB)

    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"http://testserver/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["model"] == served.name
    assert job["queue_position"] == 0
    assert job["attempt"] == 0
    assert job["progress"] is None and job["error"] is None and job["images"] == []
    assert job["timings"]["created_at"] and job["timings"]["started_at"] is None
    # Defaults are resolved from the model, so the resource shows what will run.
    assert job["request"] == {
        "prompt": "a red circle",
        "negative_prompt": "",
        "width": served.default_width,
        "height": served.default_height,
        "steps": 2,
        "guidance_scale": served.default_guidance_scale,
        "scheduler": served.default_scheduler,
        "seed": 7,
        "num_images": 1,
        "metadata": True,
    }


def test_rq_job_carries_only_the_job_id(client: TestClient, redis: Redis, served: ModelRecord) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]

    [rq_job] = model_queue(served.name, redis).get_jobs()
    assert rq_job.id == job_id
    assert rq_job.func_name == "worker.task.run_job"
    assert rq_job.args == [job_id] and rq_job.kwargs == {}
    payload = json.loads(zlib.decompress(redis.hget(f"rq:job:{job_id}", "data")))  # JSON, not pickle
    assert payload == ["worker.task.run_job", None, [job_id], {}]


def test_random_seed_is_chosen_and_shown_when_omitted(client: TestClient) -> None:
    job = client.post("/v1/jobs", json={"prompt": "a red circle"}).json()
    assert isinstance(job["request"]["seed"], int)


def test_queue_positions_follow_submission_order(client: TestClient) -> None:
    ids = [client.post("/v1/jobs", json=TINY_JOB).json()["id"] for _ in range(3)]
    assert [client.get(f"/v1/jobs/{job_id}").json()["queue_position"] for job_id in ids] == [0, 1, 2]


def test_job_runs_to_succeeded_with_seeds_images_and_timings(
    client: TestClient, settings: Settings, engine
) -> None:
    job_id = client.post("/v1/jobs", json={**TINY_JOB, "num_images": 2}).json()["id"]
    assert work(settings, engine)

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 1
    assert job["seeds"] == [7, 8]
    assert job["progress"] == {"step": 2, "total": 2} or job["progress"]["step"] == job["progress"]["total"]
    assert job["queue_position"] is None
    timings = job["timings"]
    assert timings["created_at"] <= timings["started_at"] <= timings["finished_at"]
    assert [image["url"] for image in job["images"]] == [
        f"http://testserver/v1/jobs/{job_id}/images/0.png",
        f"http://testserver/v1/jobs/{job_id}/images/1.png",
    ]
    assert [image["seed"] for image in job["images"]] == [7, 8]


def test_unknown_job_is_404_with_an_error_body(client: TestClient) -> None:
    for method in ("get", "delete"):
        response = getattr(client, method)("/v1/jobs/0123456789abcdef0123456789abcdef")
        assert response.status_code == 404
        assert response.json()["code"] == "job_not_found"
        assert "0123456789abcdef0123456789abcdef" in response.json()["message"]


def test_delete_of_a_queued_job_removes_it_and_it_never_runs(
    client: TestClient, redis: Redis, settings: Settings, engine, served: ModelRecord
) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]

    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204

    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    assert model_queue(served.name, redis).count == 0
    assert not work(settings, engine)  # nothing left to take
    assert not redis.exists(keys.job(job_id))


def test_delete_of_a_finished_job_removes_its_images(client: TestClient, redis: Redis, settings: Settings, engine) -> None:
    job_id = client.post("/v1/jobs", json={**TINY_JOB, "num_images": 2}).json()["id"]
    work(settings, engine)
    assert redis.exists(keys.image(job_id, 0), keys.image(job_id, 1)) == 2

    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204

    assert redis.exists(keys.job(job_id), keys.image(job_id, 0), keys.image(job_id, 1)) == 0
    assert client.get(f"/v1/jobs/{job_id}/images/0.png").status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 404
