"""Runs one diffq job on the loaded engine: claim, validate, generate, store.

Every write goes through the store's guarded scripts with this run's attempt
token, so a job deleted meanwhile is never recreated and a stale run never
overwrites a newer one. Failures of the request or the model end the job
``failed`` with a code and message; the worker itself keeps running.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.exceptions
from PIL import Image
from rq.timeouts import JobTimeoutException

from app.contract.records import ErrorCode, ImageRecord, JobParams, JobRecord, ModelRecord, utcnow
from app.contract import events, keys
from app.contract.store import StoredImage, WriteResult
from model.engine import GenerationRequest, GenerationResult, Padding
from worker.context import WorkerContext
from worker.png import encode_journey, encode_png, png_text
from worker.progress import (
    JobAbandonedError,
    JobCanceledError,
    JobHandBackError,
    PreviewSettings,
    ProgressReporter,
)

log = logging.getLogger(__name__)


def generation_request(params: JobParams, inputs: Mapping[str, bytes] | None = None) -> GenerationRequest:
    """The engine's request for a job's resolved parameters and its stored input PNGs."""
    inputs = inputs or {}
    outpaint = params.outpaint
    return GenerationRequest(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        scheduler=params.scheduler,
        seed=params.seed,
        num_images=params.num_images,
        mode=params.mode.value,
        image=_open_png(inputs["image"]) if params.image is not None else None,
        mask=_open_png(inputs["mask"]) if params.mask is not None else None,
        strength=params.strength,
        outpaint=Padding(**outpaint.model_dump()) if outpaint is not None else None,
        journey=params.journey,
    )


def _open_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


class JobRunner:
    """One job from claim to result, in the worker process."""

    def __init__(self, context: WorkerContext) -> None:
        self.context = context
        self.store = context.store
        self.settings = context.settings
        self.model: ModelRecord = context.heartbeat.model

    def run(self, job_id: str) -> None:
        token = uuid.uuid4().hex
        record = self.store.claim(job_id, self.context.worker_id, token)
        if record is None:
            log.info("job %s: deleted or ended before it started; skipping", job_id)
            return
        log.info("job %s: attempt %d started", job_id, record.attempt)
        self._publish(job_id, "running", {"attempt": record.attempt})
        deadline = record.request.deadline_at
        if deadline is not None and deadline < utcnow() and record.attempt == 1:
            self._fail(record, token, ErrorCode.DEADLINE_EXCEEDED, "still queued when its deadline passed")
            return
        with self.context.heartbeat.busy(job_id):
            self._run_claimed(record, token)

    def _run_claimed(self, record: JobRecord, token: str) -> None:
        engine = self.context.engine
        inputs = {}
        for name in ("image", "mask"):
            if getattr(record.request, name) is not None:
                png = self.store.job_input(record.id, name)
                if png is None:
                    self._fail(record, token, ErrorCode.INVALID_REQUEST, f"{name}: the stored input has expired")
                    return
                inputs[name] = png
        try:
            request = engine.validate(generation_request(record.request, inputs))
        except ValueError as error:  # the engine names the field and what it accepts
            self._fail(record, token, ErrorCode.INVALID_REQUEST, str(error))
            return

        previews = PreviewSettings(
            decoder=self.settings.preview_decoder,
            interval=self.settings.preview_interval,
            ttl=self.settings.result_ttl,
            size=(request.width, request.height),
        )
        progress = ProgressReporter(
            self.store, record.id, token, self.settings.progress_interval,
            engine=engine, previews=previews, event_ttl=self.settings.job_ttl,
            overdue=self.context.shutdown.overdue,
        )
        started = time.monotonic()
        try:
            [result] = engine.generate([request], on_step=progress)
        except JobAbandonedError as stop:
            log.info("job %s: %s", record.id, stop)
            return
        except JobCanceledError as stop:
            log.info("job %s: %s", record.id, stop)
            self._end(record, token, "canceled", {"status": "canceled", "finished_at": utcnow().isoformat()})
            return
        except JobHandBackError as stop:
            log.info("job %s: %s; handing it back to the queue", record.id, stop)
            result, _ = self.store.requeue(record.id, token, lost=False)
            if result is WriteResult.WRITTEN:
                self.context.shutdown.handed_back.add(record.id)  # DiffqWorker re-enqueues it in RQ
                self._publish(record.id, "queued", {"status": "queued", "reason": "worker_shutdown",
                                                    "attempt": record.attempt})
            return
        except JobTimeoutException:
            self._fail(record, token, ErrorCode.TIMEOUT, f"ran longer than {self.settings.job_timeout} s")
            return
        except ValueError as error:
            self._fail(record, token, ErrorCode.INVALID_REQUEST, str(error))
            return
        except Exception as error:  # a model failure ends this job, never the worker
            log.exception("job %s: generation failed", record.id)
            self._fail(record, token, ErrorCode.GENERATION_ERROR, f"{type(error).__name__}: {error}")
            return
        self._succeed(record, token, result)
        self._record_duration(time.monotonic() - started)

    def _record_duration(self, seconds: float) -> None:
        """Recent job durations of this model, for the ETAs of queued jobs."""
        key = keys.model_durations(self.model.name)
        with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(key, f"{seconds:.3f}")
            pipe.ltrim(key, 0, 19)
            pipe.execute()

    def _publish(self, job_id: str, type: str, data: dict[str, Any]) -> None:
        try:
            events.publish(self.store.redis, job_id, type, data, self.settings.job_ttl)
        except redis.exceptions.RedisError as error:  # the record holds the truth; streams re-read it
            log.warning("job %s: could not publish %s event: %s", job_id, type, error)

    def _end(self, record: JobRecord, token: str, event: str, values: dict[str, Any],
             images: Sequence[StoredImage] = (), blobs: Mapping[str, bytes] | None = None) -> WriteResult:
        """Store the job's final fields (and results) and, if that stuck, publish its terminal event."""
        outcome = self._while_redis_recovers(
            lambda: self.store.finish(record.id, token, values, images, job_ttl=self.settings.job_ttl,
                                      result_ttl=self.settings.result_ttl, blobs=blobs)
        )
        if outcome is WriteResult.WRITTEN:
            data = {key: values[key] for key in ("error", "seeds") if key in values}
            self._publish(record.id, event, {"status": values["status"], **data, "images": len(images)})
        return outcome

    def _while_redis_recovers(self, write: Callable[[], WriteResult]) -> WriteResult:
        """Retry a final write while Redis is unreachable (a restart), for up to ``redis_retry`` s."""
        deadline, wait = time.monotonic() + self.settings.redis_retry, 0.2
        while True:
            try:
                return write()
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
                if time.monotonic() + wait > deadline:
                    raise
                log.warning("Redis unreachable while storing a result (%s); retrying in %.1f s", error, wait)
                time.sleep(wait)
                wait = min(wait * 2, 5.0)

    def _succeed(self, record: JobRecord, token: str, result: GenerationResult) -> None:
        params = record.request
        images: list[StoredImage] = []
        image_records: list[ImageRecord] = []
        for index, (image, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
            text = png_text(params, seed, self.model) if params.metadata else None
            png = encode_png(image, text)
            images.append(StoredImage(index=index, png=png))
            image_records.append(
                ImageRecord(
                    index=index,
                    seed=seed,
                    width=image.width,
                    height=image.height,
                    sha256=hashlib.sha256(png).hexdigest(),
                    size_bytes=len(png),
                )
            )
        values: dict[str, Any] = {
            "status": "succeeded",
            "finished_at": utcnow().isoformat(),
            "seeds": list(result.seeds),
            "warnings": [*record.warnings, *result.warnings],  # the API's (about inputs), then the model's
            "parameters": _jsonable(result.parameters),
            "images": [image.model_dump(mode="json") for image in image_records],
            "journeys": len(result.journeys),
        }
        journeys = {keys.journey(record.id, n): encode_journey(frames) for n, frames in enumerate(result.journeys)}
        outcome = self._end(record, token, "succeeded", values, images, journeys)
        if outcome is WriteResult.WRITTEN:
            log.info("job %s: succeeded with %d image(s)", record.id, len(images))
        else:
            log.info("job %s: result discarded, record %s", record.id, outcome.name.lower())

    def _fail(self, record: JobRecord, token: str, code: ErrorCode, message: str) -> None:
        log.info("job %s: failed (%s): %s", record.id, code.value, message)
        values = {
            "status": "failed",
            "finished_at": utcnow().isoformat(),
            "error": {"code": code.value, "message": message},
        }
        self._end(record, token, "failed", values)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    """The engine's parameters, with anything JSON cannot hold turned into text."""
    plain = (str, int, float, bool, type(None))
    return {key: value if isinstance(value, plain) else str(value) for key, value in values.items()}
