"""The Prometheus collector behind ``GET /metrics``: it reads Redis on each scrape.

The API process runs no jobs, so it keeps no counters of its own: every figure
comes from what all workers and API processes share in Redis. Queue depths are
RQ's queue lengths, live workers come from the registry (with GPU memory where
a worker reports it), and job figures from ``diffq.app.contract.metrics``. Every API
process reports the same numbers: scrape one, or aggregate with ``max``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import redis.exceptions
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis import Redis

from diffq.app.contract import memory, metrics
from diffq.app.contract.registry import Registry, served_by
from diffq.app.contract.rq_adapter import queue_depths
from diffq.app.core import backpressure

log = logging.getLogger(__name__)

HISTOGRAM_NAMES = {
    "queue_wait": (
        "diffq_job_queue_wait_seconds",
        "Seconds from a job's creation to the start of the run that ended it.",
    ),
    "run": ("diffq_job_run_seconds", "Seconds from the start of a job's run to its end."),
}


class DiffqCollector(Collector):
    """Queue, worker and job figures of the whole deployment, read from Redis at scrape time."""

    def __init__(self, redis: Callable[[], Redis], heartbeat_ttl: int) -> None:
        self._redis = redis
        self._heartbeat_ttl = heartbeat_ttl

    def describe(self) -> list[Metric]:
        return []  # registering must not read Redis (it may be down when the API starts)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("diffq_redis_up", "1 when Redis answered this scrape, else 0.")
        client = self._redis()
        try:
            figures = metrics.read(client)
            used = memory.read(client)
            running = backpressure.running_by_model(client)
            workers = Registry(client, self._heartbeat_ttl).live_workers()
            depths = queue_depths(client)
        except (redis.exceptions.RedisError, OSError) as error:
            log.warning("metrics scrape: Redis unavailable: %s", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield GaugeMetricFamily("diffq_redis_memory_used_bytes", "Redis's used_memory.", value=used.used_bytes)
        yield GaugeMetricFamily(
            "diffq_redis_memory_max_bytes",
            "Redis's maxmemory (0: no limit; a full Redis refuses new jobs with 503 redis_full).",
            value=used.max_bytes,
        )
        models = sorted({*depths, *figures, *running, *(name for w in workers for name in served_by(w))})

        depth = GaugeMetricFamily("diffq_queue_depth", "Jobs waiting in the model's queue.", labels=["model"])
        live = GaugeMetricFamily(
            "diffq_workers", "Live workers serving the model (heartbeat not expired).", labels=["model"]
        )
        busy = GaugeMetricFamily("diffq_workers_busy", "Live workers running a job now.", labels=["model"])
        runs = GaugeMetricFamily("diffq_jobs_running", "Jobs claimed by a worker and not ended.", labels=["model"])
        load = GaugeMetricFamily(
            "diffq_load_per_worker",
            "(queued + running) / live workers, the figure to autoscale on (no worker: counted as one).",
            labels=["model"],
        )
        for model in models:
            depth.add_metric([model], depths.get(model, 0))
            serving = [w for w in workers if model in served_by(w)]
            live.add_metric([model], len(serving))
            busy.add_metric([model], sum(1 for w in serving if w.current_job is not None))
            model_load = backpressure.ModelLoad(depths.get(model, 0), running.get(model, 0), len(serving))
            runs.add_metric([model], model_load.running)
            load.add_metric([model], model_load.per_worker)
        yield from (depth, live, busy, runs, load)

        gpu = GaugeMetricFamily(
            "diffq_worker_gpu_memory_bytes",
            "GPU memory of a worker's device at its latest heartbeat, where the worker reports it.",
            labels=["worker", "model", "device", "type"],
        )
        for worker in workers:
            for kind in ("allocated", "reserved", "total"):
                value = getattr(worker, f"gpu_memory_{kind}_bytes")
                if value is not None:
                    gpu.add_metric([worker.id, worker.model, worker.device, kind], value)
        yield gpu

        finished = CounterMetricFamily(
            "diffq_jobs_finished", "Jobs that ended, by final status.", labels=["model", "status"]
        )
        failures = CounterMetricFamily("diffq_job_failures", "Failed jobs by error code.", labels=["model", "code"])
        images = CounterMetricFamily("diffq_images_generated", "Images made.", labels=["model"])
        steps = CounterMetricFamily("diffq_denoising_steps", "Denoising steps run by succeeded jobs.", labels=["model"])
        rate = GaugeMetricFamily(
            "diffq_denoising_steps_per_second",
            "Mean denoising steps per second over all succeeded runs (per job: a batch of "
            "jobs run together counts each job's own steps).",
            labels=["model"],
        )
        histograms = {
            kind: HistogramMetricFamily(name, documentation, labels=["model"])
            for kind, (name, documentation) in HISTOGRAM_NAMES.items()
        }
        for model, figure in sorted(figures.items()):
            for status, count in sorted(figure.jobs.items()):
                finished.add_metric([model, status], count)
            for code, count in sorted(figure.failures.items()):
                failures.add_metric([model, code], count)
            images.add_metric([model], figure.images)
            steps.add_metric([model], figure.steps)
            if figure.steps_per_second is not None:
                rate.add_metric([model], figure.steps_per_second)
            for kind, histogram in figure.histograms.items():
                buckets = [(floatToGoString(bound), count) for bound, count in histogram.buckets]
                histograms[kind].add_metric([model], buckets, histogram.sum)
        yield from (finished, failures, images, steps, rate, *histograms.values())
