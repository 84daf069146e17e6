"""worker/runner.py: a job's life on a real worker, from claim to stored PNGs."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient
from redis import Redis

from diffq.app.contract import keys
from diffq.app.contract.store import JobStore
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB, png_text, wait_for, work

pytestmark = pytest.mark.usefixtures("served")

SLOW_JOB = {**TINY_JOB, "steps": 60, "scheduler": "ddim"}
"""Long enough (tens of steps) for another thread to watch or delete it mid-run."""


def _record_statuses(redis: Redis, job_id: str, stop: threading.Event, seen: list[str]) -> None:
    """Poll the record's status field (cheaply: the GIL is shared with the denoising loop)."""
    while True:
        raw = redis.hget(keys.job(job_id), "status")
        status = json.loads(raw) if raw else "gone"
        if not seen or seen[-1] != status:
            seen.append(status)
        if stop.is_set():
            return
        stop.wait(0.01)


def test_job_goes_queued_running_succeeded_with_progress(
    client: TestClient, redis: Redis, settings: Settings, engine
) -> None:
    job_id = client.post("/v1/jobs", json=SLOW_JOB).json()["id"]
    seen: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_record_statuses, args=(redis, job_id, stop, seen))
    watcher.start()
    try:
        work(settings, engine)
    finally:
        stop.set()
        watcher.join()

    assert seen == ["queued", "running", "succeeded"]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["progress"]["step"], job["progress"]["total"], job["progress"]["eta_seconds"]) == (60, 60, 0)
    assert job["progress"]["step_seconds"] > 0
    stored = JobStore(redis).get(job_id)
    assert stored.parameters["weights_hash"] and stored.parameters["seed"] == 7


def test_png_metadata_records_the_generation_parameters(
    client: TestClient, settings: Settings, engine, served
) -> None:
    request = {**TINY_JOB, "negative_prompt": "blurry", "guidance_scale": 5.0, "scheduler": "euler"}
    job_id = client.post("/v1/jobs", json=request).json()["id"]
    work(settings, engine)

    text = png_text(client.get(f"/v1/jobs/{job_id}/images/0.png").content)

    assert text["prompt"] == "a red circle"
    assert text["negative_prompt"] == "blurry"
    assert (text["steps"], text["scheduler"], text["guidance_scale"], text["seed"]) == ("2", "euler", "5.0", "7")
    assert (text["width"], text["height"]) == (str(served.default_width), str(served.default_height))
    assert (text["model"], text["weights_hash"]) == (served.name, served.weights_hash)
    assert text["diffq_version"]


def test_png_metadata_is_left_out_on_request(client: TestClient, settings: Settings, engine) -> None:
    job_id = client.post("/v1/jobs", json={**TINY_JOB, "metadata": False}).json()["id"]
    work(settings, engine)

    # No generation parameters; the "generated" label (XMP) stays: tests/test_provenance.py
    assert set(png_text(client.get(f"/v1/jobs/{job_id}/images/0.png").content)) == {"XML:com.adobe.xmp"}


def test_same_request_and_seed_give_byte_identical_pngs(client: TestClient, settings: Settings, engine) -> None:
    ids = [client.post("/v1/jobs", json=TINY_JOB).json()["id"] for _ in range(2)]
    work(settings, engine)

    first, second = (client.get(f"/v1/jobs/{job_id}/images/0.png").content for job_id in ids)
    assert first == second


def test_deleting_a_running_job_stops_it_and_nothing_is_recreated(
    client: TestClient, redis: Redis, settings: Settings, engine
) -> None:
    job_id = client.post("/v1/jobs", json=SLOW_JOB).json()["id"]
    store = JobStore(redis)

    def delete_once_running() -> None:
        wait_for(lambda: (record := store.get(job_id)) is not None and record.progress is not None, interval=0.001)
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204

    deleter = threading.Thread(target=delete_once_running)
    deleter.start()
    work(settings, engine)
    deleter.join()

    assert redis.keys(f"{keys.job(job_id)}*") == []
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404


def test_engine_rejection_at_run_time_fails_the_job_and_the_worker_goes_on(
    client: TestClient, redis: Redis, settings: Settings, engine
) -> None:
    bad_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    good_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]
    # The model's limits changed between submit and run (say, a worker with another model took over).
    request = json.loads(redis.hget(keys.job(bad_id), "request"))
    redis.hset(keys.job(bad_id), "request", json.dumps({**request, "width": 7}))

    work(settings, engine)

    bad = client.get(f"/v1/jobs/{bad_id}").json()
    assert bad["status"] == "failed"
    assert bad["error"]["code"] == "invalid_request"
    assert bad["error"]["message"].startswith("width")
    assert bad["images"] == [] and bad["timings"]["finished_at"]
    assert client.get(f"/v1/jobs/{good_id}").json()["status"] == "succeeded"


def test_a_value_error_from_the_model_on_a_valid_request_is_a_generation_error(
    client: TestClient, settings: Settings, engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # diffusers refuses what it cannot run with a ValueError from its pipeline's check_inputs. On a
    # request the rules accepted, that is the model's failure, not the client's invalid_request.
    def refuse(*args, **kwargs) -> None:
        raise ValueError("`height` and `width` have to be divisible by 8 but are 16 and 16.")

    monkeypatch.setattr(engine.pipe, "check_inputs", refuse)
    job_id = client.post("/v1/jobs", json=TINY_JOB).json()["id"]

    work(settings, engine)

    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "generation_error",
                            "message": "ValueError: `height` and `width` have to be divisible by 8 but are 16 and 16."}
