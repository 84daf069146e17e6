"""Starts a worker process: load its models, register, take jobs until told to stop.

A worker serves one model, or several (``diffq.worker.models``): each is loaded once at start to
learn its limits (and its load time), then kept in a bounded cache of loaded pipelines.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import redis.exceptions

from diffq.app.contract import connection, memory, metrics
from diffq.app.contract.records import ModelRecord, WorkerRecord, utcnow
from diffq.app.contract.registry import Registry
from diffq.app.contract.rq_adapter import SERIALIZER
from diffq.app.contract.store import JobStore
from diffq.app.contract.tasks import queue_name
from diffq.app.settings import Settings
from diffq.app.storage.factory import ready_store
from diffq.app.storage.sweep import StoreSweeper, StoreSweeperThread
from diffq.worker import context
from diffq.worker.context import WorkerContext
from diffq.worker.heartbeat import Heartbeat
from diffq.worker.marking import Marker
from diffq.worker.models import ModelCache, QueueChooser, model_sources
from diffq.worker.rq_worker import DiffqWorker
from diffq.worker.stops import StopListener
from diffq.worker.sweeper import Sweeper, SweeperThread

if TYPE_CHECKING:
    from diffq.model.engine import Engine

log = logging.getLogger(__name__)

T = TypeVar("T")


def when_redis_answers(step: Callable[[], T]) -> T:
    """``step()``, retried with backoff for as long as Redis is unreachable: a worker started
    while Redis restarts waits for it (as its work loop rides out an outage) instead of exiting.
    A refused password or ACL is configuration, not an outage: it stops the worker at once."""
    wait = 0.5
    while True:
        try:
            return step()
        except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError):
            raise  # both subclass ConnectionError; retrying would hang a misconfigured worker forever
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            log.warning("Redis unreachable at start (%s); retrying in %.1f s", error, wait)
            time.sleep(wait)
            wait = min(wait * 2, 5.0)


def load_engine(settings: Settings, path: Path | None = None, name: str | None = None) -> Engine:
    """A model this worker serves (default: DIFFQ_MODEL_PATH's), loaded once for the life of the process
    (or until a multi-model worker evicts it)."""
    import torch

    from diffq.model.engine import Engine

    if settings.torch_threads:
        # On a CPU shared with other processes, fewer threads avoid oversubscription (often much faster).
        torch.set_num_threads(settings.torch_threads)
    main = path is None or path == settings.model_path
    engine = Engine.load(
        settings.model_path if path is None else path,
        device=settings.device,
        dtype=settings.dtype,
        name=settings.model_name if name is None else name,
        max_steps=settings.max_steps,
        max_images=settings.max_images_per_job,
        inpaint_path=settings.inpaint_model_path if main else None,
        single_file_config=settings.single_file_config,
        lora_dir=settings.lora_dir,
        lora_cache_size=settings.lora_cache_size,
        fast_path={"auto": None, "on": True, "off": False}[settings.fast_path],
        compile=settings.compile,
        compile_mode=settings.compile_mode,
        vae_tiling_pixels=settings.vae_tiling_pixels,
    )
    if engine.fast_path:
        log.info("fast path on %s (%s): %s", engine.info.device, engine.info.dtype, "; ".join(engine.fast_path))
        # A compiled UNet compiles now, not in the first job; a second batch size makes its batch
        # dimension dynamic, so batches of any size run without compiling again.
        batch_sizes = (1, 2) if settings.compile and settings.batch_max * settings.max_images_per_job > 1 else (1,)
        seconds = engine.warm_up(batch_sizes)
        log.info(
            "warm-up at %dx%d, batch sizes %s: %.1f s",
            engine.info.default_width,
            engine.info.default_height,
            list(batch_sizes),
            seconds,
        )
    else:
        log.info("fast path off on %s (%s)", engine.info.device, engine.info.dtype)
    if settings.preview_decoder == "latent":
        engine.prepare_previews()
    return engine


def model_record(engine: Engine) -> ModelRecord:
    """What the API validates requests against, straight from the engine."""
    return ModelRecord.model_validate(dataclasses.asdict(engine.info))


def load_models(settings: Settings, engine: Engine | None = None) -> tuple[ModelCache, list[ModelRecord]]:
    """Every model the settings name (``engine``: the one model, already loaded), each loaded
    once to read its record, in a cache bounded by the settings' memory budgets."""
    if engine is not None:
        cache = ModelCache(lambda name: engine)
        cache.get(engine.info.name)
        return cache, [model_record(engine)]
    sources = model_sources(settings)
    cache = ModelCache(
        lambda name: load_engine(settings, sources[name], name),
        settings.model_memory_bytes,
        settings.model_cpu_memory_bytes,
    )
    records = [model_record(cache.get(name)) for name in reversed(sources)]  # the main model loads last
    return cache, records[::-1]


def run_worker(
    settings: Settings,
    *,
    engine: Engine | None = None,
    burst: bool = False,
    models: tuple[ModelCache, list[ModelRecord]] | None = None,
    marker: Marker | None = None,
) -> bool:
    """Serve jobs of its models until stopped (SIGTERM/SIGINT) or, with ``burst``, until their queues are empty.

    ``engine`` lets tests share one loaded model between workers; ``models`` is what
    ``load_models`` loaded (default: load them now). Returns whether any job was taken.
    """
    marker = marker if marker is not None else Marker.from_settings(settings)
    cache, records = models if models is not None else load_models(settings, engine)
    model = records[0]
    engine = cache.get(model.name)
    names = [record.name for record in records]
    redis = connection.sync_client(settings)
    # EvictionPolicyError: refuse to serve. Redis down (a restart): wait for it, as the work loop would.
    when_redis_answers(lambda: memory.check_policy(redis, settings.redis_allow_eviction))
    host, pid = socket.gethostname(), os.getpid()
    worker_id = f"{host}.{pid}.{uuid.uuid4().hex[:8]}"
    now = utcnow()
    record = WorkerRecord(
        id=worker_id,
        model=model.name,
        device=model.device,
        dtype=model.dtype,
        host=host,
        pid=pid,
        queue=queue_name(model.name),
        started_at=now,
        heartbeat_at=now,
        models=names,
    )

    def status() -> dict:
        return {"loaded": cache.loaded, "load_seconds": dict(cache.load_seconds)}

    tally = metrics.Tally()
    heartbeat = Heartbeat(
        Registry(redis, settings.heartbeat_ttl),
        record,
        records,
        settings.heartbeat_interval,
        status,
        also=lambda: tally.flush(redis, due_only=True),
    )
    results = when_redis_answers(lambda: ready_store(settings, redis))  # raises, naming the setting, if unusable
    stops = StopListener(redis)
    context.install(
        WorkerContext(
            worker_id=worker_id,
            engine=engine,
            settings=settings,
            redis=redis,
            store=JobStore(redis),
            heartbeat=heartbeat,
            marker=marker,
            results=results,
            models=cache,
            stops=stops,
            metrics=tally,
        )
    )
    rq_worker = DiffqWorker(
        [queue_name(name) for name in names],
        name=worker_id,
        connection=redis,
        serializer=SERIALIZER,
    )
    if len(names) > 1:
        rq_worker.chooser = QueueChooser(names, settings.model_switch_after)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    sweepers = [SweeperThread(Sweeper(redis, settings, name, worker_id), settings.sweep_interval) for name in names]
    store_sweeper = StoreSweeperThread(StoreSweeper(redis, results, settings), settings.store_sweep_interval)
    heartbeat.start()
    stops.start()
    store_sweeper.start()
    for sweeper in sweepers:
        sweeper.start()
    log.info(
        "worker %s serving model(s) %s on %s (%s); loaded: %s",
        worker_id,
        ", ".join(map(repr, names)),
        model.device,
        model.dtype,
        ", ".join(cache.loaded),
    )
    try:
        return rq_worker.serve(burst=burst, logging_level=settings.log_level.upper())
    finally:
        for sweeper in sweepers:
            sweeper.stop()
        store_sweeper.stop()
        stops.stop()
        heartbeat.stop()
        tally.flush(redis)
        context.install(None)
        for sig, handler in handlers.items():  # RQ installed its own; give the caller's back
            signal.signal(sig, handler)
        redis.close()
