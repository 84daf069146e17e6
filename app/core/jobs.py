"""Submitting, reading and deleting jobs: the API's side of the job lifecycle."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis import Redis
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from app.contract import events, keys, metrics
from app.contract import status as job_status
from app.contract.adapters import list_adapters
from app.auth.caller import Caller
from app.auth.quotas import Quotas
from app.contract.records import ErrorCode, ErrorInfo, ImageRecord, JobParams, JobRecord, ModelRecord, utcnow
from app.contract.registry import Registry, ServedModel
from app.contract.status import JobStatus
from app.contract.store import CancelResult, JobStore
from app.contract.tasks import Place, enqueue, model_queue, rq_status
from app.core.errors import (
    FieldProblem,
    IdempotencyInProgressError,
    ImageNotFoundError,
    InvalidRequestError,
    JobFinishedError,
    JobNotFoundError,
    TooManyQueuedJobsError,
    UnknownModelError,
)
from app.core.idempotency import IdempotencyStore
from app.core.inputs import prepare_inputs
from app.core.validation import resolve_request
from app.schemas.jobs import JobCreate
from app.settings import Settings
from app.webhooks.deliver import attempts, attempts_key
from app.webhooks.urls import AllowList, check_url

#: Seconds a replayed Idempotency-Key waits for the job its first request is still creating.
IDEMPOTENCY_WAIT = 2.0
IDEMPOTENCY_POLL = 0.02
#: A reservation older than this whose job record is missing stands for a deleted or expired job.
IDEMPOTENCY_CREATING = 60.0

log = logging.getLogger(__name__)


def new_job_id() -> str:
    """128 random bits: job ids are unguessable, so knowing one is the right to read it."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class JobView:
    """A job record as clients should see it right now."""

    record: JobRecord
    status: JobStatus
    error: ErrorInfo | None
    queue_position: int | None
    eta_seconds: float | None = None  # until it ends: from the queue ahead, or the running steps
    webhook_deliveries: list[dict[str, Any]] | None = None  # attempts so far; None: the job has no webhook


class JobService:
    """The operations behind the job endpoints, against Redis and RQ."""

    def __init__(self, redis: Redis, settings: Settings, caller: Caller | None = None) -> None:
        self.redis = redis
        self.settings = settings
        self.caller = caller if caller is not None else Caller(None, settings)
        self.store = JobStore(redis)
        self.registry = Registry(redis, settings.heartbeat_ttl)

    def submit(self, body: JobCreate, files: Mapping[str, bytes] | None = None, job_id: str | None = None) -> JobView:
        """Validate against the served model, then write the record (and input images) and
        enqueue it atomically. ``files`` holds multipart uploads by field name ("image", "mask");
        ``job_id`` is the id to create (one reserved for an Idempotency-Key), else a new one."""
        if body.webhook is not None:
            check_url(body.webhook.url, AllowList.from_settings(self.settings))  # resolves DNS: blocks
        served = self._served(body.model)
        model = served.model
        inputs = prepare_inputs(body, files or {}, model, self.settings, self.store)
        adapters = list_adapters(self.settings.lora_dir) if body.loras or "<lora:" in body.prompt else []
        request = resolve_request(body, model, inputs, adapters)
        self._check_cost(request)
        if body.webhook is not None:
            request = request.model_copy(update={"webhook": body.webhook})
        if self.caller.strip_metadata:
            request = request.model_copy(update={"metadata": False})
        caller, ttl = self.caller, self.settings.job_ttl
        record = JobRecord(id=job_id or new_job_id(), model=model.name, request=request, warnings=inputs.warnings,
                           owner=caller.owner)
        quotas = Quotas(self.redis, caller.scope) if caller.key is not None else None
        if quotas is not None and not quotas.reserve_queued(record.id, caller.max_queued_jobs, ttl):
            raise TooManyQueuedJobsError(caller.max_queued_jobs)
        queue = model_queue(model.name, self.redis, Place(caller.scope, caller.priority_rank, ttl))
        index = keys.owner_jobs(caller.scope)
        try:
            with self.redis.pipeline() as pipe:
                # One MULTI: a worker can never dequeue a job whose record (or inputs) are not there yet.
                enqueue(queue, record.id, self.settings, pipeline=pipe)  # RQ opens the MULTI itself
                self.store.create(record, ttl, pipeline=pipe, inputs=inputs.pngs)
                events.publish(pipe, record.id, "queued", {"status": "queued"}, ttl, webhook=record.request.webhook)
                pipe.zadd(index, {record.id: record.created_at.timestamp()})  # GET /v1/jobs: newest first
                pipe.zremrangebyrank(index, 0, -keys.JOBS_INDEX_MAX - 1)
                pipe.expire(index, ttl)
                pipe.execute()
        except BaseException:
            if quotas is not None:
                quotas.release_queued(record.id)
            raise
        log.info("job %s queued on model %s", record.id, model.name, extra={"job_id": record.id})
        return self._queued_view(record, queue.key, len(served.workers))

    def _queued_view(self, record: JobRecord, queue_key: str, workers: int) -> JobView:
        """``view`` of a job this request has just queued, in one round trip: its status is known
        (nothing to reconcile with RQ yet), and so are the model's workers."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpos(queue_key, record.id)
            pipe.lrange(keys.model_durations(record.model), 0, -1)
            found, durations = pipe.execute()
        position = found if isinstance(found, int) else 0  # None: a worker is already taking it
        deliveries = [] if record.request.webhook is not None else None
        return JobView(record=record, status=JobStatus.QUEUED, error=None, queue_position=position,
                       eta_seconds=_eta(position, workers, durations), webhook_deliveries=deliveries)

    def _check_cost(self, request: JobParams) -> None:
        """Refuse a job bigger than the caller's budget of width × height × steps × images."""
        cost = request.width * request.height * request.steps * request.num_images
        budget = self.caller.max_job_cost
        if cost > budget:
            message = (f"width × height × steps × num_images = {request.width} × {request.height} × {request.steps} × "
                       f"{request.num_images} = {cost}, over this deployment's budget of {budget} per job; ask for "
                       "fewer steps, images or pixels")
            raise InvalidRequestError([FieldProblem("steps", message)])

    def recent(self, limit: int) -> list[JobView]:
        """The newest ``limit`` jobs that still exist, newest first; drops index entries of
        deleted or expired jobs as it meets them."""
        views: list[JobView] = []
        start = 0
        index = keys.owner_jobs(self.caller.scope)
        while len(views) < limit:
            ids = [i.decode() for i in self.redis.zrevrange(index, start, start + limit - 1)]
            if not ids:
                break
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(keys.job(job_id))
                found = pipe.execute()
            gone = [job_id for job_id, fields in zip(ids, found, strict=True) if not fields]
            views.extend(self.view(JobRecord.from_hash(fields)) for fields in found if fields)
            if gone:
                self.redis.zrem(index, *gone)
            start += len(ids) - len(gone)
        return views[:limit]

    def submit_once(
        self, key: str, body_fingerprint: str, body: JobCreate, files: Mapping[str, bytes] | None = None
    ) -> tuple[JobView, bool]:
        """``submit`` under an Idempotency-Key: the first request with ``key`` creates the job, every
        later one with the same body gets that job (``True``: a replay); another body raises
        ``IdempotencyConflictError``. A replay that arrives while the first request is still
        creating the job waits up to ``IDEMPOTENCY_WAIT`` seconds for it, then raises
        ``IdempotencyInProgressError``; if the first request failed (its reservation is released),
        this one creates the job instead."""
        store = IdempotencyStore(self.redis, self.settings.idempotency_ttl)
        while True:
            reservation = store.reserve(key, body_fingerprint, new_job_id(), scope=self.caller.owner or "")
            if reservation.created:
                try:
                    return self.submit(body, files, job_id=reservation.job_id), False
                except BaseException:
                    store.release(key, reservation.job_id, scope=self.caller.owner or "")  # so a retry can succeed
                    raise
            deadline = time.monotonic() + IDEMPOTENCY_WAIT
            while True:
                record = self.store.get(reservation.job_id)
                if record is not None:
                    return self.view(record), True
                if (utcnow() - reservation.created_at).total_seconds() > IDEMPOTENCY_CREATING:
                    raise JobNotFoundError(reservation.job_id)  # created long ago, since deleted or expired
                held = store.get(key, scope=self.caller.owner or "")
                if held is None or held["job_id"] != reservation.job_id:
                    break  # the first request failed and released the key: reserve it again
                if time.monotonic() >= deadline:
                    raise IdempotencyInProgressError(key, reservation.job_id)
                time.sleep(IDEMPOTENCY_POLL)

    def get(self, job_id: str) -> JobView:
        """The job as it is now; raises ``JobNotFoundError``."""
        return self.view(self._record(job_id))

    def _record(self, job_id: str) -> JobRecord:
        """The caller's job ``job_id``; another key's job is ``JobNotFoundError`` as a missing one is."""
        record = self.store.get(job_id)
        if record is None or not self.caller.can_see(record.owner):
            raise JobNotFoundError(job_id)
        return record

    def _require(self, job_id: str) -> None:
        """Raise ``JobNotFoundError`` unless the caller may act on job ``job_id`` (one field read)."""
        if self.caller.key is None:
            return
        raw = self.redis.hget(keys.job(job_id), "owner")
        if raw is None or not self.caller.can_see(json.loads(raw)):
            raise JobNotFoundError(job_id)

    def view(self, record: JobRecord) -> JobView:
        """Combine the record with RQ's view: RQ knows of failures the worker could not record."""
        deadline = record.request.deadline_at
        if record.status is JobStatus.QUEUED and deadline is not None and deadline < utcnow():
            # Ended here too, so a client sees deadline_exceeded even while no worker sweeps.
            if self.store.expire_if_queued(record.id, self.settings.job_ttl):
                model_queue(record.model, self.redis).remove(record.id)
                metrics.record_finished(self.redis, record.model, "failed", ErrorCode.DEADLINE_EXCEEDED.value)
            record = self.store.get(record.id) or record
        status, error = record.status, record.error
        if not status.is_terminal:
            status, error = self._reconcile(record)
        position, eta = None, None
        if status is JobStatus.QUEUED:
            found = self.redis.lpos(model_queue(record.model, self.redis).key, record.id)
            position = found if isinstance(found, int) else 0  # None: a worker is taking it off the queue
            eta = self._queued_eta(record.model, position)
        elif status is JobStatus.RUNNING and record.progress is not None:
            eta = record.progress.eta_seconds
        deliveries = attempts(self.redis, record.id) if record.request.webhook is not None else None
        return JobView(record=record, status=status, error=error, queue_position=position, eta_seconds=eta,
                       webhook_deliveries=deliveries)

    def _queued_eta(self, model: str, position: int) -> float | None:
        durations = self.redis.lrange(keys.model_durations(model), 0, -1)
        if not durations:
            return None
        workers = sum(len(entry.workers) for entry in self.registry.served_models() if entry.model.name == model)
        return _eta(position, workers, durations)

    def cancel(self, job_id: str) -> JobView:
        """Cancel a job: a queued one never runs, a running one stops at its next denoising step.

        Canceling a canceled job again changes nothing; a finished job raises ``JobFinishedError``.
        """
        self._require(job_id)
        result, status = self.store.cancel(job_id, utcnow().isoformat())
        if result is CancelResult.MISSING:
            raise JobNotFoundError(job_id)
        if result is CancelResult.ENDED and status is not JobStatus.CANCELED:
            raise JobFinishedError(f"job {job_id!r} already {status.value}; only queued or running jobs can be canceled")
        if result is CancelResult.CANCELED:
            try:
                self._rq_job(job_id).cancel()  # off the queue; RQ's own status says canceled too
            except (NoSuchJobError, InvalidJobOperation):
                pass
            events.publish(self.redis, job_id, "canceled", {"status": "canceled", "images": 0}, self.settings.job_ttl)
            view = self.get(job_id)
            metrics.record_finished(self.redis, view.record.model, "canceled")  # queued: it never ran
            log.info("job %s canceled while queued", job_id, extra={"job_id": job_id})
            return view
        if result is CancelResult.REQUESTED:
            log.info("job %s: cancel requested while running", job_id, extra={"job_id": job_id})
        return self.get(job_id)

    def preview(self, job_id: str) -> bytes:
        """The latest preview PNG of a job; raises if the job has none (yet)."""
        record = self._record(job_id)
        png = self.store.preview(job_id)
        if png is None:
            raise ImageNotFoundError(f"job {job_id!r} has no preview yet (status {record.status.value})")
        return png

    def journey(self, job_id: str, index: int) -> bytes:
        """Image ``index``'s journey animation; raises unless the job asked for one and finished."""
        record = self._record(job_id)
        data = self.store.journey(job_id, index) if index < record.journeys else None
        if data is None:
            reason = "did not ask for a journey" if not record.request.journey else "has no such journey (yet)"
            raise ImageNotFoundError(f"job {job_id!r} {reason}: journey {index}")
        return data

    def delete(self, job_id: str) -> None:
        """Remove the job and its images; a queued job will never run, a running one stops."""
        self._require(job_id)
        if not self.store.delete(job_id):
            raise JobNotFoundError(job_id)
        self.redis.delete(attempts_key(job_id))  # its webhook delivery attempts
        # A running job is left to its worker: the worker finds the record gone at its
        # next progress write and stops, and RQ then closes its own bookkeeping.
        if job_status.from_rq(rq_status(job_id, self.redis)) is not JobStatus.RUNNING:
            try:
                self._rq_job(job_id).delete(remove_from_queue=True)
            except NoSuchJobError:
                pass

    def image(self, job_id: str, index: int) -> ImageRecord:
        """An image's record (sha256, size); raises if the job or the image does not exist."""
        record = self._record(job_id)
        for image in record.images:
            if image.index == index:
                return image
        raise ImageNotFoundError(_missing_image_message(record, index))

    def image_bytes(self, job_id: str, index: int) -> bytes:
        """PNG bytes of an image; raises once they have expired or were deleted."""
        png = self.store.image(job_id, index)
        if png is None:
            raise ImageNotFoundError(f"image {index} of job {job_id!r} has expired or was deleted")
        return png

    def served_model(self, name: str | None) -> ModelRecord:
        """The model a request runs on; raises ``UnknownModelError`` naming the served ones."""
        return self._served(name).model

    def _served(self, name: str | None) -> ServedModel:
        served = {entry.model.name: entry for entry in self.registry.served_models()}
        if name is None:
            name = self.settings.default_model
        if name is None and len(served) == 1:
            name = next(iter(served))
        if name is not None and name in served:
            return served[name]
        listing = ", ".join(sorted(served)) or "none (no live workers)"
        problem = "is required when several models are served" if name is None else f"{name!r} is not served"
        raise UnknownModelError([FieldProblem("model", f"{problem}; served models: {listing}")])

    def _reconcile(self, record: JobRecord) -> tuple[JobStatus, ErrorInfo | None]:
        if record.status is JobStatus.QUEUED and record.attempt > 0:
            return record.status, None  # handed back (lost worker, shutdown): RQ's status is the old run's
        seen = job_status.from_rq(rq_status(record.id, self.redis))
        if seen is None or not seen.is_terminal:
            if record.status is JobStatus.QUEUED and seen is JobStatus.RUNNING:
                return JobStatus.RUNNING, None  # dequeued, not yet claimed by the task
            return record.status, None
        if seen is JobStatus.FAILED:
            return JobStatus.FAILED, self._rq_failure(record.id)
        if seen is JobStatus.CANCELED:
            return JobStatus.CANCELED, None
        message = "the worker ended the job without storing its result"
        return JobStatus.FAILED, ErrorInfo(code=ErrorCode.INTERNAL_ERROR.value, message=message)

    def _rq_failure(self, job_id: str) -> ErrorInfo:
        """Classify a failure that only RQ recorded (the task never got to write it)."""
        try:
            result = self._rq_job(job_id).latest_result()
            detail = (result.exc_string or "") if result is not None else ""
        except Exception:  # a malformed RQ job must not break reading the diffq record
            detail = ""
        last_line = detail.strip().splitlines()[-1] if detail.strip() else "unknown failure"
        if "RefusedTaskError" in detail:
            return ErrorInfo(code=ErrorCode.REFUSED.value, message=last_line)
        if "JobTimeoutException" in detail:
            return ErrorInfo(code=ErrorCode.TIMEOUT.value, message=f"ran longer than {self.settings.job_timeout} s")
        return ErrorInfo(code=ErrorCode.WORKER_LOST.value, message=f"the worker lost the job: {last_line}")

    def _rq_job(self, job_id: str) -> Job:
        return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)


def _eta(position: int, workers: int, durations: list[bytes]) -> float | None:
    """Seconds until a queued job ends: the jobs ahead shared among the model's live workers,
    then its own run, at the model's recent mean job time. None before any job has run."""
    if not durations:
        return None
    mean = sum(float(d) for d in durations) / len(durations)
    return round((position / max(1, workers) + 1) * mean, 2)


def _missing_image_message(record: JobRecord, index: int) -> str:
    if record.status is not JobStatus.SUCCEEDED:
        return f"job {record.id!r} has no images yet (status {record.status.value})"
    return f"job {record.id!r} has images 0..{len(record.images) - 1}; there is no image {index}"
