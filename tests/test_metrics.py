"""GET /metrics: Prometheus text read from Redis at each scrape (app/api/metrics.py, app/contract/metrics.py)."""

from __future__ import annotations

import math
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from diffq.app.contract import keys, metrics
from diffq.app.contract.records import JobMode, JobParams, JobRecord, ModelRecord, WorkerRecord, utcnow
from diffq.app.contract.registry import Registry
from diffq.app.contract.tasks import queue_name
from diffq.app.embedded_redis import free_port
from diffq.app.main import create_app
from diffq.app.settings import Settings


def scrape(client: TestClient) -> dict[str, list]:
    """Samples by metric family name."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(samples: list, name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def model_record(name: str) -> ModelRecord:
    return ModelRecord(
        name=name, pipeline_class="StableDiffusionPipeline", weights_hash="0" * 16, device="cuda:0",
        dtype="float16", default_width=64, default_height=64, min_size=16, max_size=128, size_multiple=8,
        default_steps=20, max_steps=100, default_guidance_scale=7.5, default_scheduler="dpmpp_2m",
        schedulers=["dpmpp_2m"], max_images=4,
    )


def announce(redis: Redis, worker_id: str, model: str, *, busy: bool = False, gpu: bool = False) -> None:
    now = utcnow()
    memory = {"gpu_memory_allocated_bytes": 3 * 2**30, "gpu_memory_reserved_bytes": 4 * 2**30,
              "gpu_memory_total_bytes": 80 * 2**30} if gpu else {}
    worker = WorkerRecord(id=worker_id, model=model, device="cuda:0", dtype="float16", host="gpu1", pid=1,
                          queue=queue_name(model), started_at=now, heartbeat_at=now,
                          current_job="a" * 32 if busy else None, **memory)
    Registry(redis, ttl=60).announce(worker, model_record(model))


def test_a_scrape_reports_queues_workers_job_times_steps_images_failures_and_gpu_memory(
    client: TestClient, redis: Redis
) -> None:
    announce(redis, "w1", "sd15", busy=True, gpu=True)
    announce(redis, "w2", "sd15")
    for _ in range(3):
        assert client.post("/v1/jobs", json={"prompt": "a red circle", "model": "sd15"}).status_code == 202
    # What workers would record as jobs end (simulated here; worker/runner.py calls record_job_end).
    assert metrics.record_finished(redis, "sd15", "succeeded", queue_wait_s=0.3, run_s=2.0, steps=20, images=2)
    metrics.record_finished(redis, "sd15", "succeeded", queue_wait_s=4.0, run_s=3.0, steps=40, images=1)
    metrics.record_finished(redis, "sd15", "failed", "generation_error", queue_wait_s=0.05, run_s=0.2)
    metrics.record_finished(redis, "sd15", "failed", "timeout", queue_wait_s=7000, run_s=600)
    metrics.record_finished(redis, "shapes", "succeeded", queue_wait_s=0.0, run_s=0.5, steps=20, images=1)

    samples = scrape(client)

    assert value(samples["diffq_redis_up"], "diffq_redis_up") == 1
    assert value(samples["diffq_queue_depth"], "diffq_queue_depth", model="sd15") == 3
    assert value(samples["diffq_queue_depth"], "diffq_queue_depth", model="shapes") == 0
    assert value(samples["diffq_workers"], "diffq_workers", model="sd15") == 2
    assert value(samples["diffq_workers"], "diffq_workers", model="shapes") == 0
    assert value(samples["diffq_workers_busy"], "diffq_workers_busy", model="sd15") == 1
    gpu = samples["diffq_worker_gpu_memory_bytes"]
    assert value(gpu, "diffq_worker_gpu_memory_bytes", worker="w1", type="allocated") == 3 * 2**30
    assert value(gpu, "diffq_worker_gpu_memory_bytes", worker="w1", type="total") == 80 * 2**30
    assert not [s for s in gpu if s.labels["worker"] == "w2"]  # w2 reports none

    finished = samples["diffq_jobs_finished"]
    assert value(finished, "diffq_jobs_finished_total", model="sd15", status="succeeded") == 2
    assert value(finished, "diffq_jobs_finished_total", model="sd15", status="failed") == 2
    failures = samples["diffq_job_failures"]
    assert value(failures, "diffq_job_failures_total", model="sd15", code="generation_error") == 1
    assert value(failures, "diffq_job_failures_total", model="sd15", code="timeout") == 1
    assert value(samples["diffq_images_generated"], "diffq_images_generated_total", model="sd15") == 3
    assert value(samples["diffq_denoising_steps"], "diffq_denoising_steps_total", model="sd15") == 60
    assert value(samples["diffq_denoising_steps_per_second"], "diffq_denoising_steps_per_second",
                 model="sd15") == pytest.approx(60 / 5.0)

    wait = samples["diffq_job_queue_wait_seconds"]
    assert value(wait, "diffq_job_queue_wait_seconds_bucket", model="sd15", le="0.1") == 1
    assert value(wait, "diffq_job_queue_wait_seconds_bucket", model="sd15", le="0.5") == 2
    assert value(wait, "diffq_job_queue_wait_seconds_bucket", model="sd15", le="5.0") == 3
    assert value(wait, "diffq_job_queue_wait_seconds_bucket", model="sd15", le="1800.0") == 3
    assert value(wait, "diffq_job_queue_wait_seconds_bucket", model="sd15", le="+Inf") == 4
    assert value(wait, "diffq_job_queue_wait_seconds_count", model="sd15") == 4
    assert value(wait, "diffq_job_queue_wait_seconds_sum", model="sd15") == pytest.approx(7004.35)
    run = samples["diffq_job_run_seconds"]
    assert value(run, "diffq_job_run_seconds_bucket", model="sd15", le="2.5") == 2
    assert value(run, "diffq_job_run_seconds_bucket", model="sd15", le="600.0") == 4
    assert value(run, "diffq_job_run_seconds_count", model="shapes") == 1
    assert "diffq_api_process_resident_memory_bytes" in samples  # the API process' own figures


def test_a_queued_job_canceled_or_past_its_deadline_counts_without_a_run(
    client: TestClient, redis: Redis, settings: Settings
) -> None:
    announce(redis, "w1", "sd15")
    job = client.post("/v1/jobs", json={"prompt": "a red circle"}).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202  # again: counted once
    late = client.post("/v1/jobs", json={"prompt": "a red circle", "deadline_seconds": 0.01}).json()
    time.sleep(0.05)
    assert client.get(f"/v1/jobs/{late['id']}").json()["error"]["code"] == "deadline_exceeded"

    samples = scrape(client)

    finished = samples["diffq_jobs_finished"]
    assert value(finished, "diffq_jobs_finished_total", model="sd15", status="canceled") == 1
    assert value(samples["diffq_job_failures"], "diffq_job_failures_total", model="sd15",
                 code="deadline_exceeded") == 1
    assert not [s for s in samples["diffq_job_run_seconds"] if s.labels.get("model") == "sd15"]


def test_scrape_with_redis_down_says_so_instead_of_failing(settings: Settings) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_app(down)) as client:
        samples = scrape(client)
    assert value(samples["diffq_redis_up"], "diffq_redis_up") == 0
    assert "diffq_queue_depth" not in samples


def test_openmetrics_is_served_when_asked_for(client: TestClient, redis: Redis) -> None:
    metrics.record_finished(redis, "sd15", "succeeded", queue_wait_s=1, run_s=1, steps=1, images=1)
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_record_job_end_derives_times_and_steps_from_the_claimed_record(redis: Redis) -> None:
    created = utcnow()
    params = JobParams(prompt="x", width=64, height=64, steps=20, guidance_scale=7.5, scheduler="ddim", seed=1,
                       mode=JobMode.IMG2IMG, strength=0.5)
    record = JobRecord(id="j" * 32, model="shapes", request=params, created_at=created,
                       started_at=created + timedelta(seconds=1.5))
    values = {"status": "succeeded", "finished_at": (created + timedelta(seconds=4)).isoformat()}

    assert metrics.record_job_end(redis, record, values, images=1)
    failed = {"status": "failed", "finished_at": (created + timedelta(seconds=2)).isoformat(),
              "error": {"code": "generation_error", "message": "boom"}}
    assert metrics.record_job_end(redis, record, failed)

    figures = metrics.read(redis)["shapes"]
    assert figures.jobs == {"succeeded": 1, "failed": 1}
    assert figures.failures == {"generation_error": 1}
    assert (figures.steps, figures.images) == (10, 1)  # img2img at strength 0.5 runs 10 of 20 steps
    assert figures.steps_per_second == pytest.approx(10 / 2.5)
    assert figures.histograms["queue_wait"].sum == pytest.approx(3.0)
    assert figures.histograms["run"].sum == pytest.approx(2.5 + 0.5)


def test_buckets_written_under_older_bounds_still_read_cumulatively(redis: Redis) -> None:
    metrics.record_finished(redis, "m", "succeeded", queue_wait_s=0.2, run_s=1)
    redis.hincrby(keys.metrics("m"), "queue_wait:bucket:0.3", 2)  # a bound no longer in QUEUE_WAIT_BUCKETS
    redis.hincrby(keys.metrics("m"), "queue_wait:count", 2)

    histogram = metrics.read(redis)["m"].histograms["queue_wait"]

    by_bound = dict(histogram.buckets)
    assert (by_bound[0.25], by_bound[0.5], by_bound[math.inf]) == (1, 3, 3)
    assert histogram.count == 3


def test_metrics_never_fail_the_caller_when_redis_is_down() -> None:
    down = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    assert metrics.record_finished(down, "m", "failed", "timeout") is False


def test_a_tally_writes_many_jobs_counts_as_record_finished_would_in_one_multi(redis: Redis) -> None:
    """A worker's Tally: the same figures as writing each job at once, in one MULTI of one command
    per field, however many jobs ended (a job at once: 13 commands)."""
    redis.flushall()
    created = utcnow()
    params = JobParams(prompt="x", width=64, height=64, steps=20, guidance_scale=7.5, scheduler="ddim", seed=1)
    record = JobRecord(id="j" * 32, model="shapes", request=params, created_at=created,
                       started_at=created + timedelta(seconds=0.05))
    ended = {"status": "succeeded", "finished_at": (created + timedelta(seconds=1.5)).isoformat()}
    tally = metrics.Tally(every=3600)
    for _ in range(10):
        assert metrics.record_job_end(redis, record, ended, images=1, tally=tally)
    assert not redis.exists(keys.metrics("shapes")), "held until a flush"
    assert tally.flush(redis, due_only=True) and not redis.exists(keys.metrics("shapes")), "not due yet"

    calls = sum(stats["calls"] for stats in redis.info("commandstats").values())
    assert tally.flush(redis)
    commands = sum(stats["calls"] for stats in redis.info("commandstats").values()) - calls - 1  # less the INFO
    assert commands <= 14  # MULTI, SADD, 11 fields, EXEC

    at_once = Redis(connection_pool=redis.connection_pool)
    redis_figures = metrics.read(redis)["shapes"]
    at_once.flushall()
    for _ in range(10):
        assert metrics.record_job_end(at_once, record, ended, images=1)
    each = metrics.read(at_once)["shapes"]
    assert (each.jobs, each.images, each.steps) == (redis_figures.jobs, redis_figures.images, redis_figures.steps)
    assert each.steps_seconds == pytest.approx(redis_figures.steps_seconds)
    for name, histogram in each.histograms.items():
        held = redis_figures.histograms[name]
        assert (histogram.buckets, histogram.count) == (held.buckets, held.count)
        assert histogram.sum == pytest.approx(held.sum)
    assert tally.flush(redis)  # nothing held: nothing written


def test_a_tally_keeps_its_counts_while_redis_is_down(redis: Redis) -> None:
    redis.flushall()
    tally = metrics.Tally()
    tally.add("m", [("jobs:failed", 1)])
    down = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    assert tally.flush(down) is False
    assert tally.flush(redis) and metrics.read(redis)["m"].jobs == {"failed": 1}


def test_a_tally_holds_a_models_job_durations_after_its_first_and_writes_them_with_its_counts(redis: Redis) -> None:
    """The queued jobs' ETAs read a model's last 20 durations (newest first): a worker's first
    durations of a model are written at once (the tally says so), later ones with the counts."""
    tally = metrics.Tally(every=3600)
    key = keys.model_durations("m")
    assert not tally.hold_durations("m", ["1.000"])  # the first: the caller writes it now
    with redis.pipeline() as pipe:
        metrics.write_durations(pipe, "m", ["1.000"])
        pipe.execute()
    assert tally.hold_durations("m", ["2.000", "2.000"]) and tally.hold_durations("m", ["3.000"])
    assert redis.lrange(key, 0, -1) == [b"1.000"]  # held
    assert tally.flush(redis)
    assert redis.lrange(key, 0, -1) == [b"3.000", b"2.000", b"2.000", b"1.000"]
    for n in range(30):
        assert tally.hold_durations("m", [f"{n}.000"])
    assert tally.flush(redis)
    assert redis.lrange(key, 0, -1) == [f"{n}.000".encode() for n in range(29, 9, -1)]
