"""Cross-request batching in the worker (worker/batching.py, runner, rq_worker): compatible queued
jobs run as one pipeline call, each with its own claim, progress, cancel, result and RQ bookkeeping.
Real Redis, a real RQ worker in this process, the tiny model."""

from __future__ import annotations

import io
import json
import os
import signal
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from redis import Redis
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from diffq.app.contract import events, keys
from diffq.app.contract.store import JobStore
from diffq.app.contract.tasks import model_queue, queue_name
from diffq.app.settings import Settings
from tests.helpers import TINY_JOB, job_of, png_text, post, stored_objects, wait_for, while_working, work
from diffq.worker.batching import Company, engine_batch_key
from diffq.worker.rq_worker import DiffqWorker
from diffq.worker.sweeper import Sweeper

pytestmark = pytest.mark.usefixtures("served")

SLOW_JOB = {**TINY_JOB, "steps": 60, "scheduler": "ddim"}
"""Tens of steps: long enough to watch, cancel or stop mid-run."""


@pytest.fixture
def calls(engine, monkeypatch: pytest.MonkeyPatch) -> list[list]:
    """Every engine.generate call's requests, in order (the engine still does the work)."""
    seen: list[list] = []
    original = engine.generate

    def generate(requests, on_step=None):
        seen.append(list(requests))
        return original(requests, on_step)

    monkeypatch.setattr(engine, "generate", generate)
    return seen


def pixels(client: TestClient, job_id: str, index: int = 0) -> np.ndarray:
    png = client.get(f"/v1/jobs/{job_id}/images/{index}.png").content
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def rq_statuses(redis: Redis, ids: list[str]) -> list[str]:
    return [Job.fetch(job_id, connection=redis, serializer=JSONSerializer).get_status(refresh=True) for job_id in ids]


def test_compatible_queued_jobs_run_as_one_pipeline_call(client, redis, settings, engine, calls, served) -> None:
    ids = [post(client, {**TINY_JOB, "prompt": f"a red circle {n}", "seed": 100 + n}) for n in range(6)]
    work(settings, engine)  # batch_max 4 by default

    assert [len(requests) for requests in calls] == [4, 2]
    assert [request.seed for requests in calls for request in requests] == [100 + n for n in range(6)]
    for n, job_id in enumerate(ids):
        job = job_of(client, job_id)
        assert job["status"] == "succeeded" and job["attempt"] == 1 and job["error"] is None, job
        assert job["seeds"] == [100 + n] and len(job["images"]) == 1
        text = png_text(client.get(f"/v1/jobs/{job_id}/images/0.png").content)
        assert (text["prompt"], text["seed"]) == (f"a red circle {n}", str(100 + n))
    # RQ's own bookkeeping: every job finished, as if RQ had run each one.
    queue = queue_name(served.name)
    assert rq_statuses(redis, ids) == ["finished"] * 6
    assert StartedJobRegistry(queue, connection=redis).get_job_ids() == []
    assert FailedJobRegistry(queue, connection=redis).get_job_ids() == []
    assert FinishedJobRegistry(queue, connection=redis).get_job_ids() == []  # diffq's record is the history
    counted = [redis.hget(key, "successful_job_count") for key in redis.keys("rq:worker:*")]
    assert counted == [b"6"]  # RQ's worker counters, written when the worker stopped
    assert model_queue(served.name, redis).get_job_ids() == []
    assert redis.zcard(keys.RUNNING) == 0
    assert len(redis.lrange(keys.model_durations(served.name), 0, -1)) == 6  # one per job, for ETAs


def test_an_image_made_in_a_batch_equals_the_same_request_made_alone(client, settings, engine, calls) -> None:
    bodies = [
        {**TINY_JOB, "prompt": "a red circle", "seed": 1},
        {**TINY_JOB, "prompt": "a blue square", "negative_prompt": "red", "seed": 2, "num_images": 2},
        {**TINY_JOB, "prompt": "a green star", "seed": 3},
    ]
    together = [post(client, body) for body in bodies]
    work(settings, engine)
    alone = [post(client, body) for body in bodies]
    work(settings.model_copy(update={"batch_max": 1}), engine)

    assert [len(requests) for requests in calls] == [3, 1, 1, 1]
    for body, batched, single in zip(bodies, together, alone, strict=True):
        for k in range(body.get("num_images", 1)):
            # Equal up to float rounding of batched kernels: tests/test_engine.py's tolerance.
            assert np.abs(pixels(client, batched, k) - pixels(client, single, k)).max() <= 2
    assert np.abs(pixels(client, together[0]) - pixels(client, together[2])).max() > 2  # not all one image


def test_incompatible_jobs_are_not_batched_together(client, settings, engine, calls) -> None:
    bodies = [
        {**TINY_JOB, "steps": 2, "seed": 1},
        {**TINY_JOB, "steps": 3, "seed": 2},
        {**TINY_JOB, "steps": 2, "seed": 3},
        {**TINY_JOB, "steps": 3, "seed": 4},
        {**TINY_JOB, "steps": 2, "seed": 5, "guidance_scale": 3.0},
        {**TINY_JOB, "steps": 2, "seed": 6, "scheduler": "euler"},
        {**TINY_JOB, "steps": 2, "seed": 7, "width": 24},
    ]
    ids = [post(client, body) for body in bodies]
    work(settings, engine)

    assert [[request.seed for request in requests] for requests in calls] == [[1, 3], [2, 4], [5], [6], [7]]
    for requests in calls:
        keys_ = {(r.width, r.height, r.steps, r.scheduler, r.guidance_scale, r.mode, r.strength) for r in requests}
        assert len(keys_) == 1
    assert all(job_of(client, job_id)["status"] == "succeeded" for job_id in ids)


def test_each_job_of_a_batch_reports_its_own_progress(client, redis, settings, engine, calls) -> None:
    watched = settings.model_copy(update={"progress_interval": 0.0, "preview_interval": 0.0})
    ids = [post(client, {**TINY_JOB, "steps": 6, "scheduler": "ddim", "seed": n}) for n in range(3)]
    work(watched, engine)

    assert [len(requests) for requests in calls] == [3]
    for job_id in ids:
        stream = events.read(redis, job_id)
        types = [event.type for event in stream]
        assert types[:2] == ["queued", "running"] and types[-1] == "succeeded" and types.count("running") == 1
        assert [event.data["step"] for event in stream if event.type == "progress"] == [1, 2, 3, 4, 5, 6]
        assert "preview" in types
        job = job_of(client, job_id)
        assert (job["progress"]["step"], job["progress"]["total"]) == (6, 6) and job["preview_url"]
    assert len({client.get(job_of(client, job_id)["preview_url"]).content for job_id in ids}) == 3  # own previews


def test_canceling_one_job_of_a_batch_stops_only_that_job(client, redis, settings, engine, calls) -> None:
    ids = [post(client, {**SLOW_JOB, "seed": n}) for n in range(3)]
    victim = ids[1]

    def cancel_mid_run(results: dict) -> None:
        wait_for(lambda: (job_of(client, victim).get("progress") or {}).get("step", 0) >= 3, timeout=60,
                 interval=0.01)
        response = client.post(f"/v1/jobs/{victim}/cancel")
        results["response"], results["step"] = response, response.json()["progress"]["step"]

    results = while_working(settings, engine, cancel_mid_run)
    assert results["response"].status_code == 202

    assert [len(requests) for requests in calls] == [3]  # the others were neither stopped nor rerun
    canceled = job_of(client, victim)
    assert canceled["status"] == "canceled" and canceled["images"] == [] and canceled["error"] is None
    assert canceled["progress"]["step"] <= results["step"] + 1 < SLOW_JOB["steps"]
    assert stored_objects(redis, victim) == []
    assert events.read(redis, victim)[-1].type == "canceled"
    for job_id in (ids[0], ids[2]):
        job = job_of(client, job_id)
        assert job["status"] == "succeeded" and len(job["images"]) == 1 and job["progress"]["step"] == 60
    assert rq_statuses(redis, ids) == ["finished"] * 3


def test_a_batch_whose_every_job_is_canceled_stops(client, settings, engine, calls) -> None:
    ids = [post(client, {**SLOW_JOB, "seed": n}) for n in range(2)]

    def cancel_both(results: dict) -> None:
        wait_for(lambda: (job_of(client, ids[0]).get("progress") or {}).get("step", 0) >= 3, timeout=60,
                 interval=0.01)
        for job_id in ids:
            client.post(f"/v1/jobs/{job_id}/cancel")

    while_working(settings, engine, cancel_both)
    jobs = [job_of(client, job_id) for job_id in ids]
    assert [job["status"] for job in jobs] == ["canceled", "canceled"]
    assert all(job["progress"]["step"] < SLOW_JOB["steps"] for job in jobs)


def test_rq_shows_jobs_taken_along_as_started_while_they_run(client, redis, settings, engine) -> None:
    ids = [post(client, {**SLOW_JOB, "seed": n}) for n in range(3)]

    def look_mid_run(results: dict) -> None:
        wait_for(lambda: all((job_of(client, job_id).get("progress") or {}).get("step", 0) >= 2 for job_id in ids),
                 timeout=60, interval=0.01)
        results["rq"] = rq_statuses(redis, ids)
        results["api"] = [job_of(client, job_id)["status"] for job_id in ids]
        results["queue"] = model_queue(JobStore(redis).get(ids[0]).model, redis).get_job_ids()

    results = while_working(settings, engine, look_mid_run)
    assert results["rq"] == ["started"] * 3
    assert results["api"] == ["running"] * 3
    assert results["queue"] == []
    assert [job_of(client, job_id)["status"] for job_id in ids] == ["succeeded"] * 3


def test_a_job_joins_a_batch_that_waits_for_company(client, settings, engine, calls) -> None:
    first = post(client, {**TINY_JOB, "seed": 1})
    other = post(client, {**TINY_JOB, "seed": 3, "steps": 3})  # queued, but cannot join: the lead waits
    patient = settings.model_copy(update={"batch_wait_ms": 3000.0})

    def post_once_running(results: dict) -> None:
        wait_for(lambda: job_of(client, first)["status"] == "running", timeout=30, interval=0.005)
        results["second"] = post(client, {**TINY_JOB, "seed": 2})

    results = while_working(patient, engine, post_once_running)
    assert [[request.seed for request in requests] for requests in calls] == [[1, 2], [3]]
    assert job_of(client, results["second"])["status"] == "succeeded"
    assert job_of(client, other)["status"] == "succeeded"


def test_a_lone_job_does_not_wait_for_company(client, redis, engine, served) -> None:
    lead_id = post(client, TINY_JOB)
    store, queue = JobStore(redis), model_queue(served.name, redis)
    queue.dequeue_any([queue], timeout=None, connection=redis, serializer=JSONSerializer)  # the queue is empty now
    worker = DiffqWorker([queue], name="w", connection=redis, serializer=JSONSerializer)
    company = Company(worker, queue, store, "w", engine_batch_key(engine))

    started = time.monotonic()
    assert company.take(store.get(lead_id), limit=3, wait=3.0) == []
    assert time.monotonic() - started < 1.0  # not the 3 s a queue with jobs in it would get


def test_deleting_a_job_of_a_batch_leaves_the_others_and_recreates_nothing(client, redis, settings, engine) -> None:
    ids = [post(client, {**SLOW_JOB, "seed": n}) for n in range(3)]

    def delete_mid_run(results: dict) -> None:
        wait_for(lambda: (job_of(client, ids[2]).get("progress") or {}).get("step", 0) >= 3, timeout=60,
                 interval=0.01)
        assert client.delete(f"/v1/jobs/{ids[2]}").status_code == 204

    while_working(settings, engine, delete_mid_run)
    assert redis.keys(f"{keys.job(ids[2])}*") == [] and stored_objects(redis, ids[2]) == []  # its run's upload too
    assert client.get(f"/v1/jobs/{ids[2]}").status_code == 404
    assert [job_of(client, job_id)["status"] for job_id in ids[:2]] == ["succeeded"] * 2


def test_batch_max_1_runs_one_job_per_call(client, redis, settings, engine, calls) -> None:
    ids = [post(client, {**TINY_JOB, "seed": n}) for n in range(3)]
    work(settings.model_copy(update={"batch_max": 1}), engine)

    assert [len(requests) for requests in calls] == [1, 1, 1]
    assert [job_of(client, job_id)["status"] for job_id in ids] == ["succeeded"] * 3
    assert rq_statuses(redis, ids) == ["finished"] * 3


def test_a_batch_that_fails_in_the_model_runs_each_job_alone(client, settings, engine, calls) -> None:
    original = engine.generate

    def generate(requests, on_step=None):
        if len(requests) > 1:
            calls.append(list(requests))
            raise RuntimeError("CUDA out of memory (pretend)")
        return original(requests, on_step)

    engine.generate = generate  # the `calls` fixture restores the engine
    ids = [post(client, {**TINY_JOB, "seed": n}) for n in range(3)]
    work(settings, engine)

    assert [len(requests) for requests in calls] == [3, 1, 1, 1]
    assert [job_of(client, job_id)["status"] for job_id in ids] == ["succeeded"] * 3


def test_jobs_taken_along_by_a_worker_that_died_run_again(client, redis, settings, engine, served) -> None:
    ids = [post(client, {**TINY_JOB, "seed": n}) for n in range(3)]
    store = JobStore(redis)
    queue = model_queue(served.name, redis)
    # A worker that then died: RQ dequeued the first job for it, it claimed that one, took the others along.
    lead, _ = queue.dequeue_any([queue], timeout=None, connection=redis, serializer=JSONSerializer)
    store.claim(lead.id, "dead-worker-1", "lost-token")
    dead = DiffqWorker([queue], name="dead-worker-1", connection=redis, serializer=JSONSerializer)
    company = Company(dead, queue, store, "dead-worker-1", engine_batch_key(engine))
    taken = company.take(store.get(lead.id), limit=3, wait=0)
    assert [t.record.id for t in taken] == ids[1:]
    assert all(store.get(job_id).worker == "dead-worker-1" for job_id in ids)
    assert rq_statuses(redis, ids[1:]) == ["started"] * 2 and queue.get_job_ids() == []

    later = lambda: __import__("time").time() + 60  # noqa: E731  the claims look old to the sweeper
    report = Sweeper(redis, settings, served.name, "sweeper", clock=later).sweep()
    assert sorted(report.requeued) == sorted(ids)
    assert StartedJobRegistry(queue.name, connection=redis).get_job_ids() == []

    work(settings, engine)
    for job_id in ids:
        job = job_of(client, job_id)
        assert job["status"] == "succeeded" and job["attempt"] == 2 and len(job["images"]) == 1, job
    assert rq_statuses(redis, ids) == ["finished"] * 3


def test_take_leaves_refused_and_taken_jobs_alone(client, redis, settings, engine, served) -> None:
    ids = [post(client, {**TINY_JOB, "seed": n}) for n in range(3)]
    store = JobStore(redis)
    queue = model_queue(served.name, redis)
    # Someone rewrote the second RQ job to call another function: never taken along.
    Job.create("os.system", args=["true"], id=ids[1], connection=redis, serializer=JSONSerializer).save()
    dead = DiffqWorker([queue], name="w", connection=redis, serializer=JSONSerializer)
    company = Company(dead, queue, store, "w", engine_batch_key(engine))

    taken = company.take(store.get(ids[0]), limit=3, wait=0)
    assert [t.record.id for t in taken] == [ids[2]]
    assert queue.get_job_ids() == ids[:2]
    assert Company(dead, queue, store, "w2", engine_batch_key(engine)).take(store.get(ids[0]), 3, 0) == []
    assert store.get(ids[2]).worker == "w" and json.loads(redis.hget(keys.job(ids[1]), "status")) == "queued"


def test_sigterm_past_the_grace_period_hands_every_job_of_a_batch_back(client, redis, settings, engine,
                                                                        served) -> None:
    ids = [post(client, {**SLOW_JOB, "steps": 90, "seed": n}) for n in range(3)]

    def stop_mid_run(results: dict) -> None:
        wait_for(lambda: (job_of(client, ids[0]).get("progress") or {}).get("step", 0) >= 3, timeout=60,
                 interval=0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # the worker's handler, in the main thread: warm shutdown

    while_working(settings.model_copy(update={"shutdown_grace": 0.0}), engine, stop_mid_run)
    for job_id in ids:
        job = job_of(client, job_id)
        assert job["status"] == "queued" and job["attempt"] == 1, job
    assert sorted(model_queue(served.name, redis).get_job_ids()) == sorted(ids)
    assert rq_statuses(redis, ids) == ["queued"] * 3

    work(settings, engine)
    for job_id in ids:
        job = job_of(client, job_id)
        assert job["status"] == "succeeded" and job["attempt"] == 2, job


def test_a_bug_in_the_run_fails_the_batch_and_leaves_no_job_running(client, redis, settings, engine,
                                                                     monkeypatch) -> None:
    from diffq.worker.runner import JobRunner

    def broken(self, job, result) -> None:
        raise RuntimeError("a bug while storing")

    monkeypatch.setattr(JobRunner, "_succeed", broken)
    ids = [post(client, {**TINY_JOB, "seed": n}) for n in range(3)]
    work(settings, engine)

    lead, *others = (job_of(client, job_id) for job_id in ids)
    assert lead["status"] == "failed" and "a bug while storing" in lead["error"]["message"]  # diffq's record
    for job in others:
        assert job["status"] == "failed" and job["error"]["code"] == "internal_error", job
        assert "a bug while storing" in job["error"]["message"]
    assert rq_statuses(redis, ids) == ["failed", "finished", "finished"]
    assert StartedJobRegistry(queue_name(lead["model"]), connection=redis).get_job_ids() == []


def test_claim_queued_takes_a_job_off_rqs_list_and_claims_it_in_one_step(client, redis, served) -> None:
    ids = [post(client, {**TINY_JOB, "seed": n}) for n in range(3)]
    store, queue = JobStore(redis), model_queue(served.name, redis)

    record = store.claim_queued(ids[1], queue.key, "w1", "t1")
    assert record is not None and record.status.value == "running" and record.attempt == 1
    assert record.attempt_token == "t1" and redis.zscore(keys.RUNNING, ids[1]) is not None
    assert queue.get_job_ids() == [ids[0], ids[2]]
    assert store.claim_queued(ids[1], queue.key, "w2", "t2") is None  # no longer on the list: taken
    assert store.get(ids[1]).attempt_token == "t1"

    client.post(f"/v1/jobs/{ids[2]}/cancel")
    queue.push_job_id(ids[2])  # an ended job still listed (a race): left for RQ's own path
    assert store.claim_queued(ids[2], queue.key, "w1", "t3") is None
    assert ids[2] in queue.get_job_ids() and store.get(ids[2]).status.value == "canceled"


def test_store_step_checks_every_job_of_a_batch_and_writes_due_progress(redis) -> None:
    from diffq.app.contract.records import JobParams, JobRecord
    from diffq.app.contract.store import RunCheck

    store = JobStore(redis)
    params = JobParams(prompt="p", width=16, height=16, steps=10, guidance_scale=7.5, scheduler="ddim", seed=1)
    for job_id in ("a", "b", "c", "d"):
        store.create(JobRecord(id=job_id, model="tiny", request=params), ttl=100)
        store.claim(job_id, "w", f"t-{job_id}")
    store.cancel("b", "2030-01-01T00:00:00+00:00")
    store.delete("c")
    progress = {"step": 3, "total": 10, "step_seconds": 0.1, "eta_seconds": 0.7}
    redis.script_flush()  # as after a Redis restart: the script is loaded again on the spot

    runs = [("a", "t-a", progress), ("b", "t-b", progress), ("c", "t-c", None), ("d", "stale", None),
            ("d", "t-d", None)]
    assert store.step(runs) == [RunCheck.GO_ON, RunCheck.CANCEL, RunCheck.MISSING, RunCheck.STALE,
                                               RunCheck.GO_ON]
    assert store.get("a").progress.step == 3 and store.get("b").progress is None  # canceled: nothing written
    assert [(e.type, e.data) for e in events.read(redis, "a")] == [("running", {"attempt": 1}), ("progress", progress)]
    assert [e.type for e in events.read(redis, "b")] == ["running"] and not redis.exists(keys.job("c"))  # nothing recreated
    assert 0 < redis.ttl(keys.events("a")) <= 100
