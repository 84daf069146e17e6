"""Runs diffq jobs on the loaded engine: claim, validate, generate, store; one job, or a batch
of compatible queued jobs in one pipeline call (see ``diffq.worker.batching``).

Every write goes through the store's guarded scripts with this run's attempt
token, so a job deleted meanwhile is never recreated and a stale run never
overwrites a newer one. Failures of the request or the model end the job
``failed`` with a code and message; the worker itself keeps running. A batch
that runs out of device memory is run again in halves, after the engine has
given the cached memory back; a job that does not fit even alone fails with
``out_of_memory``.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any, cast

import redis.exceptions
from PIL import Image

from diffq.app.contract import metrics, replication
from diffq.app.contract.records import ErrorCode, ImageRecord, JobParams, JobRecord, ModelRecord, utcnow
from diffq.app.contract.rq_adapter import JobTimeoutException
from diffq.app.contract.store import StoredImage, WriteResult
from diffq.app.contract.tasks import model_queue
from diffq.app.storage.base import StorageUnavailableError
from diffq.app.storage.objects import OBJECT_TTL_MARGIN
from diffq.app.storage.urls import image_links, relative_proxy_url
from diffq.model.engine import (
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    StopGeneration,
    is_out_of_memory,
)
from diffq.worker import faults
from diffq.worker.context import WorkerContext
from diffq.worker.marking import Marked, SigningFailedError
from diffq.worker.progress import (
    JobCanceledError,
    JobHandBackError,
    PreviewSettings,
    ProgressReporter,
    report_step,
)
from diffq.worker.results import discard, read_input, store_run

log = logging.getLogger(__name__)

#: Seconds a finished job's preview (a full-size PNG) and event stream (4.7 KB even for a few events)
#: stay in Redis after its end, set by the finish script: a client that watched the run can still
#: fetch them; Redis keeps job state, the images are in the result store, and a stream read after
#: that is answered from the record (``diffq.app.api.routes.jobs``: an ended job without its event).
PREVIEW_AFTER_END = 300


def generation_request(params: JobParams, inputs: Mapping[str, bytes] | None = None) -> GenerationRequest:
    """The engine's request for a job's resolved parameters and its stored input PNGs."""
    inputs = inputs or {}
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
        outpaint=params.outpaint,  # the request rules' Outpaint is the engine's Padding
        journey=params.journey,
        loras=tuple((lora.name, lora.weight) for lora in params.loras),
    )


def _open_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@dataclass
class _Job:
    """A claimed job in a run: its record, attempt token, validated request and progress reporter."""

    record: JobRecord
    token: str
    request: GenerationRequest
    inputs: Mapping[str, bytes] = field(default_factory=dict)  # input PNGs by name: a signed edit's ingredient
    reporter: ProgressReporter | None = None
    live: bool = True  # still wants its images; False once canceled, abandoned or ended
    seen: int = -1  # the stop listener's generation before the claim read the record (-1: none)


class _AllStopped(StopGeneration):
    """Every job of the batch was canceled or abandoned: nobody wants the rest of the run."""


class JobRunner:
    """One job from claim to result, in the worker process, with any compatible queued jobs it
    can take along (``batch_max``): those run in the same pipeline call, each with its own
    claim, progress, cancel and result."""

    def __init__(self, context: WorkerContext) -> None:
        self.context = context
        self.store = context.store
        self.settings = context.settings
        self.model: ModelRecord = context.heartbeat.model
        self.engine = context.engine

    def run(self, job_id: str) -> None:
        token = uuid.uuid4().hex
        faults.at("dequeued")
        seen = self._stops_generation()
        record = self.store.claim(job_id, self.context.worker_id, token)  # with its `running` event
        if record is None:
            log.info("job %s: deleted or ended before it started; skipping", job_id)
            return
        # A multi-model worker: the job's own model (the RQ worker has loaded it already).
        self.engine = self.context.engine_for(record.model)
        self.model = self.context.record_for(record.model)
        with self.context.heartbeat.busy(job_id):
            jobs: list[_Job] = []
            try:
                faults.at("claimed")
                lead = self._start(record, token, seen)
                if lead is None:
                    return
                jobs = [lead]
                jobs += self._company(lead)
                self._run(jobs)
            except redis.exceptions.RedisError as error:
                # Redis failed outside the parts that ride it out: no fault of the jobs. Hand each
                # back (once Redis answers); if even that fails, the worker hands back what it
                # holds when its work loop resumes (DiffqWorker.serve).
                log.warning("job %s: Redis failed mid-run (%s); handing its job(s) back", job_id, error)
                for job in jobs or [_Job(record=record, token=token, request=None)]:  # type: ignore[arg-type]
                    # Guarded by the attempt token: one that ended or was taken over is left as it is.
                    self._while_redis_recovers(partial(self._hand_back, job, "redis_error"))
                raise
            except Exception as error:
                # A bug, or the job timeout striking outside generation: no job may stay `running`,
                # and the record (never RQ) says how each ended.
                code = ErrorCode.TIMEOUT if isinstance(error, JobTimeoutException) else ErrorCode.INTERNAL_ERROR
                for job in jobs or [_Job(record=record, token=token, request=None)]:  # type: ignore[arg-type]
                    # Guarded by the attempt token: a job that ended (or was taken over) stays as it is.
                    job.live = False
                    self._fail(job.record, job.token, code, f"{type(error).__name__}: {error}")
                raise

    def _stops_generation(self) -> int:
        """The stop listener's generation now, or -1 while it is not listening: a job claimed after
        this moment has its cancel heard (or its record read at its first step, if the listener
        subscribes again meanwhile), so its first step need not read the record the claim read."""
        stops = self.context.stops
        return stops.generation if stops is not None and stops.live else -1

    def _start(self, record: JobRecord, token: str, seen: int = -1) -> _Job | None:
        """A claimed job's start: announce it, then check its deadline, inputs and request.
        ``None`` if it ended here (failed). ``seen``: ``_stops_generation()`` before the claim."""
        log.info("job %s: attempt %d started", record.id, record.attempt)
        deadline = record.request.deadline_at
        if deadline is not None and deadline < utcnow() and record.attempt == 1:
            self._fail(record, token, ErrorCode.DEADLINE_EXCEEDED, "still queued when its deadline passed")
            return None
        inputs = {}
        for name in ("image", "mask"):
            source = getattr(record.request, name)
            if source is not None:
                try:
                    png = (
                        read_input(self.context.results, source.key, self.settings.store_retry)
                        if source.key is not None
                        else self.store.job_input(record.id, name)
                    )
                except StorageUnavailableError as error:
                    self._fail(record, token, ErrorCode.STORAGE_UNAVAILABLE, f"{name}: {error}")
                    return None
                if png is None:
                    self._fail(record, token, ErrorCode.INVALID_REQUEST, f"{name}: the stored input has expired")
                    return None
                inputs[name] = png
        try:
            request = self.engine.validate(generation_request(record.request, inputs))
        except InvalidRequestError as error:  # the engine names the field and what it accepts
            self._fail(record, token, ErrorCode.INVALID_REQUEST, str(error))
            return None
        return _Job(record=record, token=token, request=request, inputs=inputs, seen=seen)

    def _company(self, lead: _Job) -> list[_Job]:
        """Queued jobs that can share the lead's pipeline call, claimed and started (up to
        ``batch_max - 1``, waiting at most ``batch_wait_ms`` for them). None while shutting down."""
        company = self.context.batching.company
        limit = self.settings.batch_max - 1
        if company is None or limit < 1 or self.context.shutdown.deadline is not None:
            return []
        jobs = []
        seen = self._stops_generation()
        for taken in company.take(lead.record, limit, self.settings.batch_wait_ms / 1000):
            job = self._start(taken.record, taken.token, seen)
            if job is not None:
                jobs.append(job)
        return jobs

    def _reporter(self, job: _Job) -> ProgressReporter:
        assert job.request.width is not None and job.request.height is not None  # validated: sizes resolved
        previews = PreviewSettings(
            decoder=self.settings.preview_decoder,
            interval=self.settings.preview_interval,
            ttl=self.settings.result_ttl,
            size=(job.request.width, job.request.height),
        )
        return ProgressReporter(
            self.store,
            job.record.id,
            job.token,
            self.settings.progress_interval,
            engine=self.engine,
            previews=previews,
            overdue=self.context.shutdown.overdue,
            stops=self.context.stops,
            seen=job.seen,
        )

    def _run(self, jobs: list[_Job]) -> None:
        """Generate the images of ``jobs`` in one engine call and store each job's result.

        A job canceled mid-run ends ``canceled`` at once and the others go on (its rows are
        computed to the end and dropped); a deleted or re-attempted one is dropped. If every job
        is dropped, the run stops. A shutdown past its grace hands every job back to the queue.
        If a batch of several jobs fails in the model, each job is run again alone, so that a
        failure only ever fails the job it belongs to; out of device memory, it is run again in
        halves (see ``_out_of_memory``).
        """
        for job in jobs:
            job.reporter = self._reporter(job)
        started = time.monotonic()
        out_of_memory = None
        try:
            results = self.engine.generate([job.request for job in jobs], on_step=self._on_step(jobs))
        except _AllStopped:
            return
        except JobHandBackError as stop:
            log.info("%s; handing back %d job(s) to the queue", stop, sum(job.live for job in jobs))
            for job in jobs:
                if job.live:
                    self._hand_back(job, "worker_shutdown")
            return
        except JobTimeoutException:
            for job in jobs:
                if job.live:
                    job.live = False
                    self._fail(
                        job.record, job.token, ErrorCode.TIMEOUT, f"ran longer than {self.settings.job_timeout} s"
                    )
            return
        except Exception as error:  # a model failure ends these jobs, never the worker
            live = [job for job in jobs if job.live]
            if is_out_of_memory(error):
                # Handled below, once this block has let go of the error: its traceback holds
                # the failed run's tensors, which must be freed before anything runs again.
                out_of_memory = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
            elif len(live) > 1:
                log.warning(
                    "batch of %d jobs failed (%s: %s); running each alone", len(live), type(error).__name__, error
                )
                for job in live:
                    self._run([job])
                return
            else:
                for job in live:
                    job.live = False
                    # Only the engine's own refusal is the request's fault; anything else the model
                    # raises (a diffusers ValueError on a request the rules accept too) is the model's.
                    if isinstance(error, InvalidRequestError):
                        self._fail(job.record, job.token, ErrorCode.INVALID_REQUEST, str(error))
                    else:
                        log.exception("job %s: generation failed", job.record.id)
                        self._fail(
                            job.record, job.token, ErrorCode.GENERATION_ERROR, f"{type(error).__name__}: {error}"
                        )
                return
        if out_of_memory is not None:
            self._out_of_memory([job for job in jobs if job.live], out_of_memory)
            return
        for job, result in zip(jobs, results, strict=True):
            if job.live:
                job.live = False
                self._succeed(job, result)
        self._record_duration(time.monotonic() - started, len(jobs))

    def _out_of_memory(self, live: list[_Job], detail: str) -> None:
        """The device ran out of memory for ``live`` jobs: free the cache, then run a batch again
        in two halves (each may split again); a job alone that still does not fit fails with
        ``out_of_memory``, and the worker goes on with its next job."""
        self.engine.free_memory()
        if len(live) > 1:
            half = (len(live) + 1) // 2
            images = sum(job.request.num_images for job in live)
            log.warning(
                "batch of %d jobs (%d images) ran out of device memory (%s); running it again in halves "
                "of %d and %d jobs",
                len(live),
                images,
                detail,
                half,
                len(live) - half,
            )
            self._run(live[:half])
            self._run(live[half:])
            return
        for job in live:
            job.live = False
            request = job.request
            self._fail(
                job.record,
                job.token,
                ErrorCode.OUT_OF_MEMORY,
                f"{request.num_images} image(s) of {request.width}×{request.height} do not fit in this worker's "
                f"{self.model.device} memory, even run alone ({detail}); ask for fewer images or a smaller size",
            )

    def _on_step(self, jobs: list[_Job]) -> Callable[..., None]:
        """The engine's ``on_step`` for a batch: each job's own reporter sees its own latents."""

        def on_step(step: int, total: int, latents_by_request: Any = None, denoised_by_request: Any = None) -> None:
            indices = latents_by_request.keys() if latents_by_request else range(len(jobs))
            running = [index for index in indices if jobs[index].live]
            if running:
                # a live job has its reporter (set when its run started)
                runs = [
                    (
                        cast(ProgressReporter, jobs[index].reporter),
                        {index: denoised_by_request[index]} if denoised_by_request else None,
                    )
                    for index in running
                ]
                for index, stop in zip(running, report_step(runs, step, total), strict=True):
                    job = jobs[index]
                    if isinstance(stop, JobCanceledError):
                        log.info("job %s: %s", job.record.id, stop)
                        job.live = False
                        self._end(
                            job.record,
                            job.token,
                            "canceled",
                            {"status": "canceled", "finished_at": utcnow().isoformat()},
                        )
                    elif stop is not None:  # deleted, or taken over by another attempt
                        log.info("job %s: %s", job.record.id, stop)
                        job.live = False
            if not any(job.live for job in jobs):
                raise _AllStopped(f"every job of the run stopped at step {step} of {total}")

        return on_step

    def _hand_back(self, job: _Job, reason: str) -> WriteResult:
        """Put a job back at the front of its queue (with its ``queued`` event), not counting the
        attempt as lost: this worker is stopping, or Redis failed under it."""
        job.live = False
        queue_key = model_queue(self.model.name, self.store.redis).key
        result, _, _ = self.store.requeue(job.record.id, job.token, queue_key, lost=False, reason=reason)
        if result is WriteResult.WRITTEN:
            self.context.shutdown.handed_back.add(job.record.id)  # DiffqWorker tidies RQ's side of it
        return result

    def _record_duration(self, seconds: float, jobs: int = 1) -> None:
        """Recent job durations of this model, for the ETAs of queued jobs: a batch of n jobs
        counts as n jobs of 1/n of its time each (what the queue behind it sees). The model's first
        job on this worker writes at once (ETAs from the start); later ones go with the metrics'
        next write (``Tally``, every 10 s: 2 commands per write instead of per job)."""
        values = [f"{seconds / jobs:.3f}"] * jobs
        tally = self.context.metrics
        if tally is not None and tally.hold_durations(self.model.name, values):
            return
        with self.store.redis.pipeline(transaction=False) as pipe:
            metrics.write_durations(pipe, self.model.name, values)
            pipe.execute()

    def _end(
        self,
        record: JobRecord,
        token: str,
        event: str,
        values: dict[str, Any],
        images: Sequence[StoredImage] = (),
        blobs: Mapping[str, bytes] | None = None,
    ) -> WriteResult:
        """Store the job's final fields, results and terminal event (``event``: the status it ends
        in, with the job's ``expires_at`` and image URLs) in one guarded step, retried while Redis
        restarts. The record, and with it its objects, then lives the job's retention."""
        assert values["status"] == event
        retention = self._retention(record)
        expires_at = (utcnow() + timedelta(seconds=retention)).isoformat()
        extra = {"expires_at": expires_at, **self._image_urls(record, values)}

        def finish() -> WriteResult:
            faults.at("store")
            return self.store.finish(
                record.id,
                token,
                values,
                images,
                job_ttl=retention,
                result_ttl=retention,
                blobs=blobs,
                event_data=extra,
                events_ttl=min(PREVIEW_AFTER_END, retention),
            )

        outcome = self._replicated(finish)
        faults.at("stored")
        if outcome is WriteResult.WRITTEN:
            count = len(images) or len(values.get("images", []))
            metrics.record_job_end(self.store.redis, record, values, count, tally=self.context.metrics)  # never raises
        return outcome

    def _replicated(self, write: Callable[[], WriteResult]) -> WriteResult:
        """``write``, then wait until ``redis_wait_replicas`` replicas hold it, so a failover cannot
        lose a result a client may have read. Unconfirmed (the primary died before replicating),
        the write is made again on the promoted replica; finding the job already ended there
        means the first write survived, which counts as written."""
        deadline, written = time.monotonic() + self.settings.redis_retry, False
        while True:
            outcome = self._while_redis_recovers(write)
            if outcome is WriteResult.ENDED and written:
                outcome = WriteResult.WRITTEN
            if outcome is not WriteResult.WRITTEN:
                return outcome
            written = True
            try:
                replication.confirm(
                    self.store.redis, self.settings.redis_wait_replicas, self.settings.redis_wait_timeout
                )
                return outcome
            except (
                replication.ReplicationTimeout,
                redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
            ) as error:
                if time.monotonic() > deadline:
                    log.warning(
                        "result stored but not confirmed by replicas within %s s: %s", self.settings.redis_retry, error
                    )
                    return outcome
                log.warning("result not yet on a replica (%s); storing it again", error)
                time.sleep(0.2)

    def _retention(self, record: JobRecord) -> int:
        return record.request.retention_seconds or self.settings.job_ttl

    def _image_urls(self, record: JobRecord, values: dict[str, Any]) -> dict[str, Any]:
        """The finished images' URLs for the terminal event and its webhook (``diffq.app.storage.urls``;
        proxied ones relative, as a worker knows no host)."""
        images = [ImageRecord.model_validate(image) for image in values.get("images", [])]
        if not images:
            return {}
        ended = record.model_copy(update={"images": images, "journeys": values.get("journeys", 0)})
        links = [image_links(ended, image, self.settings, self.context.results, relative_proxy_url) for image in images]
        return {"image_urls": [link.url for link in links]}

    def _while_redis_recovers(self, write: Callable[[], WriteResult]) -> WriteResult:
        """Retry a final write while Redis is unreachable (a restart), for up to ``redis_retry`` s."""
        deadline, wait = time.monotonic() + self.settings.redis_retry, 0.2
        while True:
            try:
                return write()
            except redis.exceptions.RedisError as error:
                unavailable = isinstance(error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
                if not (unavailable or replication.is_failover_refusal(error)) or time.monotonic() + wait > deadline:
                    raise
                log.warning("Redis unreachable while storing a result (%s); retrying in %.1f s", error, wait)
                time.sleep(wait)
                wait = min(wait * 2, 5.0)

    def _succeed(self, job: _Job, result: GenerationResult) -> None:
        """Mark and encode each image (``diffq.worker.marking``: watermark, labels, signature last), write
        them to the result store under this attempt's token, then reference them in the record
        through the guarded finish script; a store that stays down fails the job."""
        record, token, params = job.record, job.token, job.record.request
        warnings: list[str] = []

        def encode(image: Image.Image, seed: int) -> Marked:
            marked = self.context.marker.finish(image, params, seed, self.model, job.inputs)
            warnings.extend(warning for warning in marked.warnings if warning not in warnings)
            return marked

        try:
            stored = store_run(
                self.context.results,
                record,
                token,
                list(zip(result.images, result.seeds, strict=True)),
                encode,
                result.journeys,
                self._retention(record) + OBJECT_TTL_MARGIN,
                self.settings.store_retry,
            )
        except SigningFailedError as error:
            self._fail(record, token, ErrorCode.SIGNING_FAILED, str(error))
            return
        except StorageUnavailableError as error:
            self._fail(record, token, ErrorCode.STORAGE_UNAVAILABLE, f"could not store the images: {error}")
            return
        values: dict[str, Any] = {
            "status": "succeeded",
            "finished_at": utcnow().isoformat(),
            "seeds": list(result.seeds),
            # the API's (inputs), the model's, the marks' (watermark)
            "warnings": [*record.warnings, *result.warnings, *warnings],
            "parameters": _jsonable(result.parameters),
            "images": [image.model_dump(mode="json") for image in stored.images],
            "journeys": len(result.journeys),
        }
        final = job.reporter.final_progress() if job.reporter is not None else None
        if final is not None:  # the last step's progress, written with the end instead of just before it
            values["progress"] = final
        outcome = self._end(record, token, "succeeded", values)
        if outcome is WriteResult.WRITTEN:
            log.info("job %s: succeeded with %d image(s)", record.id, len(stored.images))
        else:
            discard(self.context.results, stored.keys)  # never referenced: a stale or deleted run's upload
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

    def jsonable(value: Any) -> Any:
        if isinstance(value, list):  # e.g. loras: [{"name", "weight", "sha256"}]
            return [jsonable(item) for item in value]
        if isinstance(value, dict):
            return {str(k): jsonable(v) for k, v in value.items()}
        return value if isinstance(value, plain) else str(value)

    return {key: jsonable(value) for key, value in values.items()}
