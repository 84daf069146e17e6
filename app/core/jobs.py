"""Submitting, reading and deleting jobs: the API's side of the job lifecycle."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, cast
from weakref import WeakKeyDictionary

from anyio import to_thread
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import WatchError

from diffq.app.auth.caller import Caller
from diffq.app.contract import keys, metrics, replication
from diffq.app.contract.adapters import list_adapters
from diffq.app.contract.records import BatchRef, ErrorCode, ErrorInfo, ImageRecord, JobRecord, ModelRecord, utcnow
from diffq.app.contract.registry import Registry, ServedModel
from diffq.app.contract.status import JobStatus
from diffq.app.contract.store import CancelResult, JobStore, Read, Submitted
from diffq.app.contract.tasks import FairQueue, Place, cancel_queued, forget, model_queue, rq_job_fields
from diffq.app.core import backpressure
from diffq.app.core.errors import (
    ContentCredentialsUnavailableError,
    FieldProblem,
    ImageNotFoundError,
    InvalidRequestError,
    JobFinishedError,
    JobNotFoundError,
    NotReplicatedError,
    QueueFullError,
    ResultStoreUnavailableError,
    TooManyQueuedJobsError,
    UnknownModelError,
)
from diffq.app.core.idempotency import Entry, IdempotencyStore, KeyTakenError
from diffq.app.core.inputs import PreparedInputs, has_inputs, infer_mode, prepare_inputs
from diffq.app.core.validation import check_before_decode, resolve_request, respecified
from diffq.app.schemas.jobs import JobCreate
from diffq.app.settings import Settings
from diffq.app.storage import objects
from diffq.app.storage.base import ResultStore, StorageUnavailableError
from diffq.app.storage.factory import open_store
from diffq.app.webhooks.deliver import attempts, attempts_key
from diffq.app.webhooks.urls import AllowList, check_url

log = logging.getLogger(__name__)


#: Seconds a submit may rely on this process's last listing of served models (``Registry.served_models``).
#: Safe to be stale: the submit script checks the model's registration itself ('unserved': read again),
#: and a model the listing lacks is read afresh; what ages is the ETA's count of workers.
SERVED_MAX_AGE = 5.0


def new_job_id() -> str:
    """128 random bits: job ids are unguessable, so knowing one is the right to read it."""
    return uuid.uuid4().hex


@dataclass
class CountedRate:
    """A request's hit against its API key's rate, for the submit script to make first
    (``diffq.app.contract.rate``): the key's record, ``rate_hit``'s arguments, and its reply once made."""

    record_key: str
    arguments: Sequence[Any]
    reply: list[int] | None = None


class RateRefusedError(Exception):
    """The submit script's rate hit refused the request (over the rate, or the key revoked): nothing was
    written; ``CountedRate.reply`` says which."""


@dataclass(frozen=True)
class JobView:
    """A job record as clients should see it right now."""

    record: JobRecord
    status: JobStatus
    error: ErrorInfo | None
    queue_position: int | None
    eta_seconds: float | None = None  # until it ends: from the queue ahead, or the running steps
    webhook_deliveries: list[dict[str, Any]] | None = None  # attempts so far; None: the job has no webhook
    expires_at: datetime | None = None  # when its record (and with it its images and keys) lapses


class JobService:
    """The operations behind the job endpoints, against Redis and RQ."""

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        caller: Caller | None = None,
        results: ResultStore | None = None,
        quick: AsyncRedis | None = None,
    ) -> None:
        self.redis = redis
        self.quick = quick  # an asyncio client for ``submit_async`` and ``get_async``, on the event loop
        self.settings = settings
        self.caller = caller if caller is not None else Caller(None, settings)
        self.store = JobStore(redis)
        self.results = results if results is not None else open_store(settings, redis)
        self.registry = Registry(redis, settings.heartbeat_ttl)

    def submit(
        self,
        body: JobCreate,
        files: Mapping[str, bytes] | None = None,
        job_id: str | None = None,
        idempotency: Entry | None = None,
    ) -> JobView:
        """Validate against the served model, then write the record (and input images) and
        enqueue it atomically. ``files`` holds multipart uploads by field name ("image", "mask");
        ``job_id`` is the id to create, else a new one; ``idempotency`` an Idempotency-Key's
        reservation, written in the same transaction (its job id is the job's)."""
        if body.webhook is not None:
            check_url(body.webhook.url, AllowList.from_settings(self.settings))  # resolves DNS: blocks
        served = self._served(body.model)
        record, ttl = self.build(body, files or {}, served, job_id or (idempotency.job_id if idempotency else None))
        return self._queue(record, ttl, served, idempotency)

    def _queue(self, record: JobRecord, ttl: int, served: ServedModel, idempotency: Entry | None) -> JobView:
        """Write and queue a built job (``_write``), checked against the model's workers once more if
        they stopped since the listing was read."""
        submitted = self._write(record, ttl, served, idempotency)
        if submitted.outcome == "unserved":  # its workers stopped since the registry was read
            self.registry.forget()
            served = self._served(record.model)  # UnknownModelError unless another worker serves it now
            submitted = self._write(record, ttl, served, idempotency)
        return self._queued(record, submitted, served)

    def _queued(self, record: JobRecord, submitted: Submitted, served: ServedModel) -> JobView:
        log.info("job %s queued on model %s", record.id, record.model, extra={"job_id": record.id})
        return self._queued_view(record, submitted, len(served.workers))

    @staticmethod
    def submits_on_loop(body: JobCreate, files: Mapping[str, bytes]) -> bool:
        """Whether ``submit_async`` can take this request: nothing in it blocks (no input image to
        decode, no webhook URL to resolve, no LoRA folder to read)."""
        return not has_inputs(body, files) and body.webhook is None and not body.loras and "<lora:" not in body.prompt

    async def submit_async(self, body: JobCreate, rate: CountedRate | None = None) -> JobView:
        """``submit`` from the event loop for a request ``submits_on_loop`` accepts: validated here, written
        by the same one script through the asyncio client. Whatever is not the usual case (no fresh
        listing of the served models, or the script refused: unserved, queue full, quota) is
        ``submit``'s own code in a worker thread, as before (a refused script wrote nothing). ``rate``: the
        request's API-key rate hit, made first by the same script (its reply is left in ``rate.reply``);
        refused, nothing is written and ``RateRefusedError`` is raised."""
        assert self.quick is not None, "submit_async needs the asyncio client"
        await self._fresh_listing()
        served = self._served_cached(body.model)
        if served is None:  # not served (a 422 naming the served models), or served since the listing
            served = await to_thread.run_sync(self._served, body.model)
        record, ttl = self.build(body, {}, served, None)
        caller, model = self.caller, served.model.name
        queue = _fair_queue(model, self.redis, Place(caller.scope, caller.priority_rank, ttl))
        submitted = await self.store.submit_async(
            self.quick,
            record,
            ttl,
            queue,
            **self._submit_limits(record, queue, served),
            rate=(rate.record_key, rate.arguments) if rate is not None else None,
        )
        if rate is not None:
            rate.reply = submitted.rate
        if submitted.outcome == "rate":
            raise RateRefusedError()
        if submitted.outcome != "ok":
            return await to_thread.run_sync(self._queue, record, ttl, served, None)
        return self._queued(record, submitted, served)

    def _submit_limits(self, record: JobRecord, queue: FairQueue, served: ServedModel) -> dict[str, Any]:
        """What the submit script checks and writes besides the record, the same on both paths."""
        caller = self.caller
        return {
            "rq_fields": rq_job_fields(queue, record.id, self.settings),
            "registration": served.registration,
            "max_depth": backpressure.max_depth(self.settings, served.model.name),
            "queued_cap": caller.max_queued_jobs if caller.key is not None else None,
            "rq_ttl": self.settings.job_ttl,
        }

    def _write(self, record: JobRecord, ttl: int, served: ServedModel, idempotency: Entry | None) -> Submitted:
        """Create and queue the job in one round trip (``JobStore.submit``: the Idempotency-Key, the
        queue's depth, the owner's queued cap, the record, RQ's job, the fair place in the queue
        and the ``queued`` event, all or nothing); raises what refused it, if anything did."""
        caller, model = self.caller, served.model.name
        queue = cast(FairQueue, model_queue(model, self.redis, Place(caller.scope, caller.priority_rank, ttl)))
        submitted = self.store.submit(
            record,
            ttl,
            queue,
            **self._submit_limits(record, queue, served),
            idempotency=(idempotency.redis_key, idempotency.value, idempotency.ttl) if idempotency else None,
        )
        if submitted.outcome == "taken":
            raise KeyTakenError(idempotency.redis_key if idempotency else "")
        if submitted.outcome == "full":
            depth = int(submitted.detail or 0)
            raise QueueFullError(
                model, depth, backpressure.estimated_wait(self.redis, model, depth, len(served.workers))
            )
        if submitted.outcome == "quota":
            raise TooManyQueuedJobsError(caller.max_queued_jobs)
        return submitted

    def build(
        self,
        body: JobCreate,
        files: Mapping[str, bytes],
        served: ServedModel,
        job_id: str | None,
        inputs: PreparedInputs | None = None,
        store_inputs: bool = True,
        batch: BatchRef | None = None,
    ) -> tuple[JobRecord, int]:
        """Everything ``submit`` does before its one write: validate ``body`` against ``served``'s
        model and the caller's budget and policies, store its input images, and make its record;
        returns the record and the TTL it is written with. ``inputs``: already prepared (a batch's
        shared inputs), else prepared here; ``store_inputs=False`` leaves storing them to the caller
        (``store_inputs``), as a batch does once every item has passed; ``batch``: the item it is."""
        model = served.model
        early = check_before_decode(body, model, infer_mode(body, files))  # nothing decoded yet
        if early is not None:
            self._check_cost(early[0], early[1], body.steps or model.default_steps, body.num_images)
        if inputs is None:
            inputs = prepare_inputs(body, files, model, self.settings, _StoredImages(self), self.caller.can_see)
        adapters = list_adapters(self.settings.lora_dir) if body.loras or "<lora:" in body.prompt else []
        request = resolve_request(body, model, inputs, adapters)
        self._check_cost(request.width, request.height, request.steps, request.num_images)
        retention = retention_seconds(body.retention_seconds, self.settings)
        request = request.model_copy(update={"retention_seconds": retention})
        if body.webhook is not None:
            request = request.model_copy(update={"webhook": body.webhook})
        if self.caller.strip_metadata:
            request = request.model_copy(update={"metadata": False})
        policy = self.caller.content_credentials
        if policy == "required" and self.settings.c2pa_cert is None:
            raise ContentCredentialsUnavailableError()
        if policy != "optional":
            request = request.model_copy(update={"content_credentials": policy})
        # Waiting and running, the job lives job_ttl (or its retention, if longer); its retention counts from its end.
        caller, ttl = self.caller, max(self.settings.job_ttl, retention)
        record = JobRecord(
            id=job_id or new_job_id(),
            model=model.name,
            request=request,
            warnings=inputs.warnings,
            owner=caller.owner,
            batch=batch,
        )
        if store_inputs:
            record = self.store_inputs(record, inputs.pngs, ttl)
        return record, ttl

    def build_like(self, template: JobRecord, was: JobCreate, body: JobCreate, batch: BatchRef) -> JobRecord | None:
        """``build``'s record for ``body`` (inputs not yet stored), made from ``template``, its record
        for ``was``, where ``respecified`` allows (they differ at most in prompt and seed): a batch of
        rows pays for one full ``build``, not one per row. None where it does not: ``build`` it."""
        request = respecified(template.request, was, body)
        if request is None:
            return None
        return JobRecord(
            id=new_job_id(),
            model=template.model,
            request=request,
            warnings=list(template.warnings),
            owner=template.owner,
            batch=batch,
        )

    def confirm_replicated(self) -> None:
        """Return once ``redis_wait_replicas`` replicas hold what this request wrote (the job it
        created, or found under its Idempotency-Key); else ``NotReplicatedError``: not acknowledged."""
        settings = self.settings
        try:
            replication.confirm(self.redis, settings.redis_wait_replicas, settings.redis_wait_timeout)
        except replication.ReplicationTimeout as error:
            raise NotReplicatedError(
                f"the job is not yet safe against the loss of the Redis primary ({error}); "
                "retry with the same Idempotency-Key to get this job, never a second one"
            ) from None

    def store_inputs(self, record: JobRecord, pngs: Mapping[str, bytes], ttl: int) -> JobRecord:
        """Write an editing job's input PNGs to the result store before its record exists (a
        worker may take the job the moment it is queued); the record names their keys. Inputs
        of a submit that fails after this are swept (no record refers to them). ``ttl``: the
        record's TTL; the ``redis`` store's objects outlive it by a margin (file and s3 objects
        go by the sweeper)."""
        ttl += objects.OBJECT_TTL_MARGIN
        update = {}
        for name, png in pngs.items():
            key = objects.job_input(record.id, name)
            try:
                self.results.put(key, png, "image/png", ttl)
            except StorageUnavailableError as error:
                raise ResultStoreUnavailableError(f"the result store is unreachable: {error}") from error
            update[name] = getattr(record.request, name).model_copy(update={"key": key})
        if not update:
            return record
        return record.model_copy(update={"request": record.request.model_copy(update=update)})

    def _queued_view(self, record: JobRecord, submitted: Submitted, workers: int) -> JobView:
        """``view`` of a job this request has just queued, from what its one write returned."""
        position = submitted.position if submitted.position is not None else 0  # None: a worker is taking it
        deliveries: list[dict[str, Any]] | None = [] if record.request.webhook is not None else None
        lifetime = max(self.settings.job_ttl, retention_seconds(record.request.retention_seconds, self.settings))
        expires = record.created_at + timedelta(seconds=lifetime)
        return JobView(
            record=record,
            status=JobStatus.QUEUED,
            error=None,
            queue_position=position,
            eta_seconds=_eta(position, workers, submitted.durations or []),
            webhook_deliveries=deliveries,
            expires_at=expires,
        )

    def _check_cost(self, width: int, height: int, steps: int, num_images: int) -> None:
        """Refuse a job bigger than the caller's budget of width × height × steps × images."""
        cost = width * height * steps * num_images
        budget = self.caller.max_job_cost
        if cost > budget:
            message = (
                f"width × height × steps × num_images = {width} × {height} × {steps} × "
                f"{num_images} = {cost}, over this deployment's budget of {budget} per job; ask for "
                "fewer steps, images or pixels"
            )
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
        self,
        key: str,
        body_fingerprint: str,
        body: JobCreate,
        files: Mapping[str, bytes] | None = None,
        endpoint: str = "",
    ) -> tuple[JobView, bool]:
        """``submit`` under an Idempotency-Key: the first request with ``key`` creates the job, every
        later one with the same body gets that job (``True``: a replay); another body raises
        ``IdempotencyConflictError``. The key is written in the same transaction as the job
        (``diffq.app.core.idempotency``), so it never stands for a job that does not exist; a key whose
        job was deleted or has expired raises ``JobNotFoundError``. Keys are the caller's own, and
        ``endpoint``'s own: the same key sent to another endpoint (``""`` is ``POST /v1/jobs``) is
        another key."""
        store = IdempotencyStore(self.redis, self.settings.idempotency_ttl)
        scope = self.caller.owner or ""
        if endpoint:
            scope = f"{scope}\n{endpoint}"  # no key id holds a newline: no scope spells another
        while True:
            existing = store.lookup(key, body_fingerprint, scope=scope)
            if existing is not None:
                record = self.store.get(existing.job_id)
                if record is None:
                    raise JobNotFoundError(existing.job_id)  # created long ago, since deleted or expired
                return self.view(record), True
            try:
                entry = store.entry(key, body_fingerprint, new_job_id(), scope)
                return self.submit(body, files, idempotency=entry), False
            except (KeyTakenError, WatchError):
                continue  # a concurrent request with the same key created its job first: answer with it

    def get(self, job_id: str) -> JobView:
        """The job as it is now, read in one round trip (``JobStore.read``); raises ``JobNotFoundError``."""
        found = self.store.read(job_id)
        if found is None or not self.caller.can_see(found.record.owner):
            raise JobNotFoundError(job_id)
        return self.view(found.record, found)

    async def get_async(self, job_id: str) -> JobView:
        """``get`` from the event loop: the one read through the asyncio client; the view is made here
        unless it needs more reads (a webhook's attempts, a passed deadline, a stale listing of the
        served models for the ETA), which ``view`` makes in a worker thread."""
        assert self.quick is not None, "get_async needs the asyncio client"
        found = await JobStore.read_async(self.quick, job_id)
        if found is None or not self.caller.can_see(found.record.owner):
            raise JobNotFoundError(job_id)
        if found.durations and found.record.status is JobStatus.QUEUED:
            await self._fresh_listing()  # for the ETA: the model's live workers
        if self._view_reads(found):
            return await to_thread.run_sync(self.view, found.record, found)
        return self.view(found.record, found)

    async def _fresh_listing(self) -> None:
        """Make this process's listing of the served models fresh (``Registry.served_models``), reading it
        in a worker thread when it is older than ``SERVED_MAX_AGE``: once for all the requests that find
        it stale together."""
        if self.registry.cached(SERVED_MAX_AGE) is not None:
            return
        pending = _listing_reads.get(self.redis)
        if pending is None:
            pending = asyncio.ensure_future(to_thread.run_sync(self.registry.served_models))
            _listing_reads[self.redis] = pending
            pending.add_done_callback(lambda _: _listing_reads.pop(self.redis, None))
        await asyncio.shield(pending)

    def _view_reads(self, found: Read) -> bool:
        """Whether ``view`` of ``found`` reads Redis."""
        record = found.record
        if record.request.webhook is not None:
            return True
        if record.status is not JobStatus.QUEUED:
            return False
        deadline = record.request.deadline_at
        if deadline is not None and deadline < utcnow():
            return True
        return bool(found.durations) and self.registry.cached(SERVED_MAX_AGE) is None

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

    def view(self, record: JobRecord, found: Read | None = None) -> JobView:
        """The record as a client sees it: its status, and where it waits or how far it has run.
        ``found``: what ``JobStore.read`` returned with the record (no further round trip for
        them), else they are read here."""
        deadline = record.request.deadline_at
        if record.status is JobStatus.QUEUED and deadline is not None and deadline < utcnow():
            # Ended here too, so a client sees deadline_exceeded even while no worker sweeps.
            if self.store.expire_if_queued(record.id, self.settings.job_ttl):
                model_queue(record.model, self.redis).remove(record.id)
                metrics.record_finished(self.redis, record.model, "failed", ErrorCode.DEADLINE_EXCEEDED.value)
            record, found = self.store.get(record.id) or record, None
        status, error = record.status, record.error  # diffq's record alone: RQ's view never overrides it
        position, eta = None, None
        if status is JobStatus.QUEUED:
            place = (
                found.position
                if found is not None
                else self.redis.lpos(model_queue(record.model, self.redis).key, record.id)
            )
            position = place if isinstance(place, int) else 0  # None: a worker is taking it off the queue
            eta = self._queued_eta(record.model, position, found.durations if found is not None else None)
        elif status is JobStatus.RUNNING and record.progress is not None:
            eta = record.progress.eta_seconds
        deliveries = attempts(self.redis, record.id) if record.request.webhook is not None else None
        remaining = found.pttl_ms if found is not None else self.redis.pttl(keys.job(record.id))
        expires = utcnow() + timedelta(milliseconds=remaining) if remaining and remaining > 0 else None
        return JobView(
            record=record,
            status=status,
            error=error,
            queue_position=position,
            eta_seconds=eta,
            webhook_deliveries=deliveries,
            expires_at=expires,
        )

    def _queued_eta(self, model: str, position: int, durations: list[bytes] | None = None) -> float | None:
        if durations is None:
            durations = self.redis.lrange(keys.model_durations(model), 0, -1)
        if not durations:
            return None
        served = self.registry.served_models(max_age=SERVED_MAX_AGE)
        workers = sum(len(entry.workers) for entry in served if entry.model.name == model)
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
            assert status is not None  # an ended job has its status
            raise JobFinishedError(
                f"job {job_id!r} already {status.value}; only queued or running jobs can be canceled"
            )
        if result is CancelResult.CANCELED:
            cancel_queued(self.redis, job_id)  # off the queue; RQ's own status says canceled too
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
        found = [image for image in record.images if image.index == index and index < record.journeys]
        data = None
        if found and found[0].journey_key is not None:
            data = self._read(found[0].journey_key)
        elif found:
            data = self.store.journey(job_id, index)  # a job stored before the result store
        if data is None:
            reason = "did not ask for a journey" if not record.request.journey else "has no such journey (yet)"
            raise ImageNotFoundError(f"job {job_id!r} {reason}: journey {index}")
        return data

    def delete(self, job_id: str) -> None:
        """Remove the job and its images; a queued job will never run, a running one stops."""
        self._require(job_id)
        model, status = self.redis.hmget(keys.job(job_id), "model", "status")  # diffq's record, before it goes
        if not self.store.delete(job_id):
            raise JobNotFoundError(job_id)
        try:
            self.results.delete_job(job_id)  # every attempt's objects, and the inputs
        except StorageUnavailableError as error:  # the record is gone: the sweeper removes them later
            log.warning("job %s deleted; its objects stay until the store sweep (%s)", job_id, error)
        self.redis.delete(attempts_key(job_id))  # its webhook delivery attempts
        # A running job is left to its worker: the worker finds the record gone at its
        # next progress write and stops, and RQ then closes its own bookkeeping.
        if model is not None and status is not None:
            forget(self.redis, json.loads(model), job_id, JobStatus(json.loads(status)))

    def image(self, job_id: str, index: int) -> ImageRecord:
        """An image's record (sha256, size); raises if the job or the image does not exist."""
        record = self._record(job_id)
        for image in record.images:
            if image.index == index:
                return image
        raise ImageNotFoundError(_missing_image_message(record, index))

    def image_bytes(self, job_id: str, index: int, image: ImageRecord | None = None) -> bytes:
        """The bytes of an image; raises once they have expired or were deleted, and
        ``ResultStoreUnavailableError`` (503) while the result store is down."""
        image = image if image is not None else self.image(job_id, index)
        png = self._read(image.key) if image.key is not None else self.store.image(job_id, index)
        if png is None:
            raise ImageNotFoundError(f"image {index} of job {job_id!r} has expired or was deleted")
        return png

    def _read(self, key: str) -> bytes | None:
        try:
            return self.results.get(key)
        except StorageUnavailableError as error:
            raise ResultStoreUnavailableError(f"the result store is unreachable: {error}") from error

    def served_model(self, name: str | None) -> ModelRecord:
        """The model a request runs on; raises ``UnknownModelError`` naming the served ones."""
        return self._served(name).model

    def _served_cached(self, name: str | None) -> ServedModel | None:
        """``_served`` from this process's listing if it is fresh and names the model; else None."""
        listing = self.registry.cached(SERVED_MAX_AGE)
        if listing is None:
            return None
        served = {entry.model.name: entry for entry in listing}
        asked = name if name is not None else self.settings.default_model
        name = next(iter(served)) if asked is None and len(served) == 1 else asked
        return served.get(name) if name is not None else None

    def _served(self, name: str | None) -> ServedModel:
        # A listing read within SERVED_MAX_AGE will do when it names the model; else a fresh one.
        asked = name if name is not None else self.settings.default_model
        for max_age in (SERVED_MAX_AGE, 0):
            served = {entry.model.name: entry for entry in self.registry.served_models(max_age=max_age)}
            name = next(iter(served)) if asked is None and len(served) == 1 else asked
            if name is not None and name in served:
                return served[name]
        listing = ", ".join(sorted(served)) or "none (no live workers)"
        problem = "is required when several models are served" if name is None else f"{name!r} is not served"
        raise UnknownModelError([FieldProblem("model", f"{problem}; served models: {listing}")])


#: Listings of the served models being read, by client (``JobService._fresh_listing``).
_listing_reads: WeakKeyDictionary[Redis, asyncio.Future[list[ServedModel]]] = WeakKeyDictionary()


@lru_cache(maxsize=1024)
def _fair_queue(model: str, redis: Redis, place: Place) -> FairQueue:
    """The model's queue for ``place``, made once: building RQ's ``Queue`` costs more than the rest of a submit's
    checks. ``submit_async`` reads only its key names from it."""
    return cast(FairQueue, model_queue(model, redis, place))


class _StoredImages:
    """Finished images by job and index, for inputs that name one (``job:<id>/<n>``)."""

    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs

    def get(self, job_id: str) -> JobRecord | None:
        return self.jobs.store.get(job_id)

    def image(self, job_id: str, index: int) -> bytes | None:
        record = self.jobs.store.get(job_id)
        found = [image for image in record.images if image.index == index] if record is not None else []
        if not found:
            return None
        return self.jobs.image_bytes(job_id, index, found[0])


def retention_seconds(asked: int | None, settings: Settings) -> int:
    """How long a job is kept after it ends: what it asked, else ``job_ttl`` (within ``max_retention``)."""
    return asked if asked is not None else min(settings.job_ttl, settings.max_retention)


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
