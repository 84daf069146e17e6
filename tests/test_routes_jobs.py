"""app/api/routes/jobs.py: POST/GET/DELETE /v1/jobs against a real Redis and a real worker."""

from __future__ import annotations

import json
import threading
import time
import zlib

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.api.polling import PollPacer
from diffq.app.contract import keys
from diffq.app.contract.records import ModelRecord
from diffq.app.contract.tasks import model_queue
from diffq.app.main import create_app
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB, stored_objects, work

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
        "mode": "txt2img",
        "strength": None,
        "outpaint": None,
        "image": None,
        "mask": None,
        "journey": False,
        "deadline_at": None,
        "webhook": None,
        "content_credentials": "optional",
        "output_format": "png",
        "quality": None,
        "retention_seconds": 86400,  # DIFFQ_JOB_TTL unless the request asks
        "loras": [],
    }


def test_rq_job_carries_only_the_job_id(client: TestClient, redis: Redis, served: ModelRecord) -> None:
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]

    [rq_job] = model_queue(served.name, redis).get_jobs()
    assert rq_job.id == job_id
    assert rq_job.func_name == "diffq.worker.task.run_job"
    assert rq_job.args == [job_id] and rq_job.kwargs == {}
    payload = json.loads(zlib.decompress(redis.hget(f"rq:job:{job_id}", "data")))  # JSON, not pickle
    assert payload == ["diffq.worker.task.run_job", None, [job_id], {}]


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
    assert job["progress"]["step"] == job["progress"]["total"]
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


def test_delete_of_a_finished_job_removes_its_images(
    client: TestClient, redis: Redis, settings: Settings, engine
) -> None:
    job_id = client.post("/v1/jobs", json={**TINY_JOB, "num_images": 2}).json()["id"]
    work(settings, engine)
    assert len(stored_objects(redis, job_id)) == 2  # the redis result store (the default)

    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204

    assert not redis.exists(keys.job(job_id)) and stored_objects(redis, job_id) == []
    assert client.get(f"/v1/jobs/{job_id}/images/0.png").status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 404


def _fields(response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] in ("invalid_request", "unknown_model")
    return {problem["field"]: problem["message"] for problem in body["fields"]}


@pytest.mark.parametrize(
    ("change", "field", "accepted"),
    [
        ({"prompt": "x" * 1001}, "prompt", "at most 1000 characters"),
        ({"negative_prompt": "x" * 1001}, "negative_prompt", "at most 1000 characters"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": " \n "}, "prompt", "must contain something other than whitespace"),
        ({"steps": 101}, "steps", "less than or equal to 100"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"num_images": 5}, "num_images", "less than or equal to 4"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"guidance_scale": "lots"}, "guidance_scale", "valid number"),
        ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_settings_limits_give_422_naming_the_field(client: TestClient, change: dict, field: str, accepted: str) -> None:
    fields = _fields(client.post("/v1/jobs", json={**TINY_JOB, **change}))
    assert accepted in fields[field]


def test_model_limits_give_422_naming_the_field(client: TestClient, served: ModelRecord) -> None:
    sizes = f"multiple of {served.size_multiple} between {served.min_size} and {served.max_size}"
    too_big = served.max_size + served.size_multiple
    cases = [
        ({"width": served.min_size + 1}, "width", f"{sizes} for model 'tiny'; got {served.min_size + 1}"),
        ({"height": too_big}, "height", f"{sizes} for model 'tiny'; got {too_big}"),
        ({"scheduler": "warp"}, "scheduler", f"one of: {', '.join(served.schedulers)}; got 'warp'"),
        ({"model": "sdxl"}, "model", "'sdxl' is not served; served models: tiny"),
    ]
    for change, field, accepted in cases:
        response = client.post("/v1/jobs", json={**TINY_JOB, **change})
        assert response.json()["code"] == ("unknown_model" if field == "model" else "invalid_request")
        assert accepted in _fields(response)[field]


def test_every_problem_is_reported_at_once(client: TestClient) -> None:
    fields = _fields(client.post("/v1/jobs", json={**TINY_JOB, "width": 7, "height": 9999, "scheduler": "warp"}))
    assert set(fields) == {"width", "height", "scheduler"}


def test_missing_prompt_and_bad_json_are_422(client: TestClient) -> None:
    assert "prompt" in _fields(client.post("/v1/jobs", json={"steps": 2}))
    response = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["code"] == "invalid_request"


def test_limits_follow_the_settings_dependency(client: TestClient, settings: Settings) -> None:
    from diffq.app.deps import get_settings

    strict = settings.model_copy(update={"max_steps": 3, "max_prompt_length": 5})
    client.app.dependency_overrides[get_settings] = lambda: strict
    try:
        fields = _fields(client.post("/v1/jobs", json={**TINY_JOB, "steps": 4, "prompt": "a red circle"}))
    finally:
        client.app.dependency_overrides.clear()
    assert "less than or equal to 3" in fields["steps"]
    assert "at most 5 characters" in fields["prompt"]


def test_no_live_worker_means_no_model_to_run_on(client: TestClient, redis: Redis) -> None:
    redis.flushall()  # the registration of the `served` fixture is gone
    fields = _fields(client.post("/v1/jobs", json=TINY_JOB))
    assert "served models: none (no live workers)" in fields["model"]


# --- polling --------------------------------------------------------------------------------------


def test_a_job_not_done_tells_pollers_when_to_come_back(client: TestClient, served: ModelRecord) -> None:
    job = client.post("/v1/jobs", json=TINY_JOB).json()
    queued = client.get(f"/v1/jobs/{job['id']}")
    assert queued.json()["status"] == "queued" and queued.headers["retry-after"] == "1"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    ended = client.get(f"/v1/jobs/{job['id']}")
    assert ended.json()["status"] == "canceled" and "retry-after" not in ended.headers


def test_a_plain_read_is_one_redis_round_trip(client: TestClient, served: ModelRecord, redis: Redis) -> None:
    job = client.post("/v1/jobs", json=TINY_JOB).json()
    client.get(f"/v1/jobs/{job['id']}")  # scripts loaded, models listed
    with redis.monitor() as monitor:
        poller = threading.Thread(target=lambda: client.get(f"/v1/jobs/{job['id']}"))
        poller.start()
        sent = []  # commands from clients, not from inside scripts
        while True:
            entry = monitor.next_command()
            if entry.get("client_type") != "lua":
                sent.append(entry["command"])
            elif entry["command"].startswith("LRANGE"):
                break  # the read script's last command (for a queued job)
        poller.join(5)
    assert [command.split(" ")[0] for command in sent] == ["EVALSHA"], sent


def test_a_tight_polling_loop_is_held_to_the_pace(settings: Settings, served: ModelRecord) -> None:
    # A 0.5 s pace: wide enough that a held read and an unheld one stay apart on a loaded machine.
    paced = settings.model_copy(update={"poll_interval": 0.5, "poll_burst": 2})
    with TestClient(create_app(paced)) as client:
        job = client.post("/v1/jobs", json=TINY_JOB).json()
        started = time.monotonic()
        answers = [client.get(f"/v1/jobs/{job['id']}") for _ in range(7)]  # 2 at once, then every 0.5 s
        took = time.monotonic() - started
        assert [answer.status_code for answer in answers] == [200] * 7
        assert took >= 2.4, took  # five held reads: 5 x 0.5 s
        other = client.post("/v1/jobs", json=TINY_JOB).json()  # another job has its own pace
        quick = time.monotonic()
        assert client.get(f"/v1/jobs/{other['id']}").status_code == 200 and time.monotonic() - quick < 0.4
        waited = time.monotonic()
        assert client.get(f"/v1/jobs/{job['id']}", params={"wait": 0.1}).status_code == 200  # long polls: unpaced
        assert time.monotonic() - waited < 0.45  # paced, it would take a 0.5 s hold and then the 0.1 s wait


def test_reads_beyond_the_longest_hold_are_429_with_retry_after() -> None:
    pacer = PollPacer(interval=1.0, burst=1)
    holds = [pacer.reserve("job") for _ in range(4)]
    assert holds[0] == 0 and 0.9 < holds[1] <= 1.0 and 1.9 < holds[2] <= 2.0 and holds[3] is None
    assert pacer.retry_after("job") == 1
    assert pacer.reserve("other") == 0 and PollPacer(interval=0, burst=1).reserve("job") == 0


def test_a_submit_is_refused_when_its_model_went_away_since_it_was_listed(
    client: TestClient, served: ModelRecord, redis: Redis
) -> None:
    # The API lists served models at most once a second; the job's one write checks the model's
    # registration is still the one it was validated against, and writes nothing otherwise.
    assert client.post("/v1/jobs", json=TINY_JOB).status_code == 202  # the listing is now remembered
    redis.delete(keys.model(served.name))  # its workers stopped
    refused = client.post("/v1/jobs", json=TINY_JOB)
    assert refused.status_code == 422 and refused.json()["code"] == "unknown_model", refused.text
    assert redis.llen(model_queue(served.name, redis).key) == 1
