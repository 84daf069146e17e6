"""Watching and stopping jobs: progress with ETAs, previews, journeys, the event stream,
long polls, queue positions and cancellation, on a real worker in this process (tiny model)."""

from __future__ import annotations

import io
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis

from diffq.app.contract import keys
from diffq.app.main import create_app
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB, stored_objects, wait_for, while_working, work

pytestmark = pytest.mark.usefixtures("served")

SLOW_JOB = {**TINY_JOB, "steps": 80, "scheduler": "ddim"}
"""Tens of steps: long enough to watch and cancel mid-run."""


@pytest.fixture
def watched(settings: Settings) -> Settings:
    """Every step written, a preview whenever one is due."""
    return settings.model_copy(update={"progress_interval": 0.0, "preview_interval": 0.0})


@pytest.fixture
def api(watched: Settings) -> TestClient:
    with TestClient(create_app(watched)) as client:
        yield client


def job_of(api: TestClient, job_id: str) -> dict:
    return api.get(f"/v1/jobs/{job_id}").json()


# -- cancel -----------------------------------------------------------------------------------------


def test_cancel_stops_a_running_job_within_a_step(api, watched, engine, redis: Redis) -> None:
    job_id = api.post("/v1/jobs", json=SLOW_JOB).json()["id"]

    def cancel_mid_run(results: dict) -> None:
        wait_for(lambda: (job_of(api, job_id).get("progress") or {}).get("step", 0) >= 3, timeout=60, interval=0.01)
        results["response"] = api.post(f"/v1/jobs/{job_id}/cancel")
        results["step"] = results["response"].json()["progress"]["step"]

    results = while_working(watched, engine, cancel_mid_run)
    response, step_at_cancel = results["response"], results["step"]
    assert response.status_code == 202 and response.json()["cancel_requested"] is True

    job = job_of(api, job_id)
    assert job["status"] == "canceled" and job["images"] == [] and job["error"] is None
    assert job["progress"]["step"] <= step_at_cancel + 1  # at most the step already under way
    assert job["progress"]["step"] < SLOW_JOB["steps"]
    assert stored_objects(redis, job_id) == []
    again = api.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 202 and again.json()["status"] == "canceled"  # harmless to repeat


def test_cancel_is_heard_within_a_step_between_progress_writes(api, settings, engine,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # No progress write during the run (one an hour), no previews: no step reads the record
    # unless the worker's stop listener heard the cancel (diffq.worker.stops).
    quiet = settings.model_copy(update={"progress_interval": 3600.0, "preview_decoder": "off"})
    steps: list[int] = []
    generate = engine.generate

    def counting(requests, on_step=None):
        def step(index, *args, **kwargs):
            steps.append(index)
            time.sleep(0.01)  # a few ms per step at least, so the cancel lands mid-run
            return on_step(index, *args, **kwargs)

        return generate(requests, on_step=step)

    monkeypatch.setattr(engine, "generate", counting)
    job_id = api.post("/v1/jobs", json=SLOW_JOB).json()["id"]

    def cancel_mid_run(results: dict) -> None:
        wait_for(lambda: len(steps) >= 3, timeout=60, interval=0.005)
        assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        results["step"] = len(steps)

    results = while_working(quiet, engine, cancel_mid_run)
    assert job_of(api, job_id)["status"] == "canceled"
    assert len(steps) <= results["step"] + 2 < SLOW_JOB["steps"]  # the step under way, and the next at most


def test_a_short_job_writes_no_progress_of_its_own_yet_ends_at_its_last_step(api, settings, engine,
                                                                            redis: Redis) -> None:
    # A run shorter than the progress interval makes no progress write (Redis commands a job saves);
    # the last step's progress is stored with the job's end.
    quiet = settings.model_copy(update={"progress_interval": 3600.0, "preview_decoder": "off"})
    job_id = api.post("/v1/jobs", json=SLOW_JOB).json()["id"]
    work(quiet, engine)
    job = job_of(api, job_id)
    assert job["status"] == "succeeded"
    assert (job["progress"]["step"], job["progress"]["total"], job["progress"]["eta_seconds"]) == (80, 80, 0.0)
    types = [fields[b"type"] for _, fields in redis.xrange(keys.events(job_id))]
    assert types == [b"queued", b"running", b"succeeded"]


def test_a_canceled_queued_job_never_runs(api, watched, engine) -> None:
    job_id = api.post("/v1/jobs", json=TINY_JOB).json()["id"]
    response = api.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "canceled"

    work(watched, engine)
    job = job_of(api, job_id)
    assert job["status"] == "canceled" and job["attempt"] == 0 and job["timings"]["started_at"] is None


def test_canceling_a_finished_job_is_a_conflict(api, watched, engine) -> None:
    job_id = api.post("/v1/jobs", json=TINY_JOB).json()["id"]
    work(watched, engine)
    response = api.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 409 and response.json()["code"] == "job_finished"
    assert "succeeded" in response.json()["message"]
    assert api.post(f"/v1/jobs/{'0' * 32}/cancel").status_code == 404


# -- events and long polls ------------------------------------------------------------------------------


def parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields:
            events.append(fields)
    return events


def test_event_stream_tells_the_story_in_order_and_resumes(api, watched, engine) -> None:
    job_id = api.post("/v1/jobs", json={**TINY_JOB, "steps": 6, "scheduler": "ddim"}).json()["id"]
    received: list[dict] = []

    def listen() -> None:  # subscribed while the job is still queued
        with api.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            received.extend(parse_sse(response.read().decode()))

    listener = threading.Thread(target=listen)
    listener.start()
    time.sleep(0.3)
    work(watched, engine)
    listener.join(timeout=30)

    types = [event["event"] for event in received]
    assert types[:2] == ["queued", "running"] and types[-1] == "succeeded"
    progress = [event for event in received if event["event"] == "progress"]
    assert [int(e["data"].split('"step":')[1].split(",")[0]) for e in progress] == [1, 2, 3, 4, 5, 6]
    assert "preview" in types
    ids = [tuple(map(int, event["id"].split("-"))) for event in received]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    middle = received[3]["id"]
    resumed = parse_sse(api.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": middle}).text)
    assert [event["id"] for event in resumed] == [event["id"] for event in received[4:]]


def test_event_stream_of_an_unknown_job_is_a_404(api) -> None:
    assert api.get(f"/v1/jobs/{'0' * 32}/events").status_code == 404


def test_long_poll_returns_as_soon_as_the_job_ends(api, watched, engine) -> None:
    job_id = api.post("/v1/jobs", json=SLOW_JOB).json()["id"]

    def long_poll(results: dict) -> None:
        started = time.monotonic()
        results["job"] = api.get(f"/v1/jobs/{job_id}", params={"wait": 50}).json()
        results["elapsed"] = time.monotonic() - started

    results = while_working(watched, engine, long_poll)
    assert results["job"]["status"] == "succeeded" and results["elapsed"] < 40


def test_long_poll_on_a_job_that_does_not_end_answers_after_wait(api) -> None:
    job_id = api.post("/v1/jobs", json=TINY_JOB).json()["id"]
    started = time.monotonic()
    job = api.get(f"/v1/jobs/{job_id}", params={"wait": 1}).json()
    assert job["status"] == "queued" and 0.9 <= time.monotonic() - started < 5
    assert api.get(f"/v1/jobs/{job_id}", params={"wait": 61}).status_code == 422


# -- queue positions and ETAs -----------------------------------------------------------------------------


def test_queued_jobs_report_positions_and_etas(api, redis: Redis, served) -> None:
    ids = [api.post("/v1/jobs", json=TINY_JOB).json()["id"] for _ in range(3)]
    assert [job_of(api, job_id)["queue_position"] for job_id in ids] == [0, 1, 2]
    assert job_of(api, ids[0])["eta_seconds"] is None  # no job of this model has run yet

    redis.lpush(keys.model_durations(served.name), "2.0", "4.0")  # as a worker records them
    etas = [job_of(api, job_id)["eta_seconds"] for job_id in ids]
    assert etas == [3.0, 6.0, 9.0]  # one live worker, 3 s a job


def test_running_job_reports_an_eta_from_its_steps(api, watched, engine) -> None:
    job_id = api.post("/v1/jobs", json=SLOW_JOB).json()["id"]

    def sample_while_running(results: dict) -> None:
        results["job"] = wait_for(
            lambda: (j := job_of(api, job_id))["status"] == "running" and j.get("progress") and j, timeout=60,
            interval=0.01,
        )

    job = while_working(watched, engine, sample_while_running)["job"]
    assert job["eta_seconds"] is not None and job["eta_seconds"] >= 0
    assert job["progress"]["step_seconds"] > 0


# -- previews and journeys ---------------------------------------------------------------------------------


def test_preview_is_served_during_and_after_the_run(api, watched, engine) -> None:
    job_id = api.post("/v1/jobs", json=SLOW_JOB).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}/preview.png").status_code == 404  # none yet

    def fetch_preview(results: dict) -> None:
        wait_for(lambda: job_of(api, job_id)["preview_url"], timeout=60, interval=0.01)
        results["during"] = api.get(f"/v1/jobs/{job_id}/preview.png")

    during = while_working(watched, engine, fetch_preview)["during"]

    assert during.status_code == 200 and during.headers["content-type"] == "image/png"
    assert during.headers["cache-control"] == "no-store"
    after = api.get(job_of(api, job_id)["preview_url"])
    assert after.status_code == 200 and Image.open(io.BytesIO(after.content)).size == (16, 16)


def test_journey_is_an_animation_with_a_frame_per_step(api, watched, engine) -> None:
    job_id = api.post("/v1/jobs", json={**TINY_JOB, "steps": 5, "scheduler": "ddim", "journey": True,
                                        "num_images": 2}).json()["id"]
    work(watched, engine)
    job = job_of(api, job_id)

    for image in job["images"]:
        response = api.get(image["journey_url"])
        assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
        with Image.open(io.BytesIO(response.content)) as animation:
            assert animation.format == "WEBP" and animation.n_frames == 5 and animation.size == (16, 16)
    plain = api.post("/v1/jobs", json=TINY_JOB).json()["id"]
    work(watched, engine)
    assert job_of(api, plain)["images"][0]["journey_url"] is None
    assert api.get(f"/v1/jobs/{plain}/journey/0.webp").status_code == 404


def test_a_long_poll_outlasting_a_quiet_stream_read_is_not_a_redis_error(api) -> None:
    """The blocking read waits 5 s at a time; the Redis client's own timeout must not cut it (was a 503)."""
    job_id = api.post("/v1/jobs", json=TINY_JOB).json()["id"]
    response = api.get(f"/v1/jobs/{job_id}", params={"wait": 6})
    assert response.status_code == 200 and response.json()["status"] == "queued"
