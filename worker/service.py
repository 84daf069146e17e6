"""Starts a worker process: load the model once, register, take jobs until told to stop."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import uuid
from typing import TYPE_CHECKING

from rq.serializers import JSONSerializer

from app.contract import connection, memory
from app.contract.records import ModelRecord, WorkerRecord, utcnow
from app.contract.registry import Registry
from app.contract.store import JobStore
from app.contract.tasks import queue_name
from app.settings import Settings
from app.storage.factory import ready_store
from app.storage.sweep import StoreSweeper, StoreSweeperThread
from worker import context
from worker.context import WorkerContext
from worker.heartbeat import Heartbeat
from worker.marking import Marker
from worker.rq_worker import DiffqWorker
from worker.sweeper import Sweeper, SweeperThread

if TYPE_CHECKING:
    from model.engine import Engine

log = logging.getLogger(__name__)


def load_engine(settings: Settings) -> Engine:
    """The model this worker serves, loaded once for the life of the process."""
    import torch

    from model.engine import Engine

    if settings.torch_threads:
        # On a CPU shared with other processes, fewer threads avoid oversubscription (often much faster).
        torch.set_num_threads(settings.torch_threads)
    engine = Engine.load(
        settings.model_path,
        device=settings.device,
        dtype=settings.dtype,
        name=settings.model_name,
        max_steps=settings.max_steps,
        max_images=settings.max_images_per_job,
        inpaint_path=settings.inpaint_model_path,
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
        log.info("warm-up at %dx%d, batch sizes %s: %.1f s", engine.info.default_width, engine.info.default_height,
                 list(batch_sizes), seconds)
    else:
        log.info("fast path off on %s (%s)", engine.info.device, engine.info.dtype)
    if settings.preview_decoder == "latent":
        engine.prepare_previews()
    return engine


def model_record(engine: Engine) -> ModelRecord:
    """What the API validates requests against, straight from the engine."""
    return ModelRecord.model_validate(dataclasses.asdict(engine.info))


def run_worker(settings: Settings, *, engine: Engine | None = None, burst: bool = False,
               marker: Marker | None = None) -> bool:
    """Serve jobs of one model until stopped (SIGTERM/SIGINT) or, with ``burst``, until its queue is empty.

    ``engine`` lets tests share one loaded model between workers. Returns
    whether any job was taken.
    """
    marker = marker if marker is not None else Marker.from_settings(settings)
    engine = engine if engine is not None else load_engine(settings)
    model = model_record(engine)
    redis = connection.sync_client(settings)
    memory.check_policy(redis, settings.redis_allow_eviction)  # EvictionPolicyError: refuse to serve
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
    )
    heartbeat = Heartbeat(Registry(redis, settings.heartbeat_ttl), record, model, settings.heartbeat_interval)
    results = ready_store(settings, redis)  # raises, naming the setting, if it cannot be written to
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
        )
    )
    rq_worker = DiffqWorker(
        [queue_name(model.name)],
        name=worker_id,
        connection=redis,
        serializer=JSONSerializer,
    )
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    sweeper = SweeperThread(Sweeper(redis, settings, model.name, worker_id), settings.sweep_interval)
    store_sweeper = StoreSweeperThread(StoreSweeper(redis, results, settings), settings.store_sweep_interval)
    heartbeat.start()
    sweeper.start()
    store_sweeper.start()
    log.info("worker %s serving model %r on %s (%s) from queue %r", worker_id, model.name, model.device,
             model.dtype, queue_name(model.name))
    try:
        return rq_worker.serve(burst=burst, logging_level=settings.log_level.upper())
    finally:
        sweeper.stop()
        store_sweeper.stop()
        heartbeat.stop()
        context.install(None)
        for sig, handler in handlers.items():  # RQ installed its own; give the caller's back
            signal.signal(sig, handler)
        redis.close()
