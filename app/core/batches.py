"""Batches: many jobs in one request, read, canceled and deleted as one.

A batch's items are ordinary jobs, made exactly as ``JobService.submit`` makes one (its
``build``: the same validation, budget, policies, retention and record; an item that differs
from the one before only in prompt and seed is made from that one's record, ``build_like``,
checking again only what those two change), then written to
Redis together: one ``MULTI`` holds the batch record, every item's RQ job, record and
``queued`` event (with the fair-share placement of ``diffq.app.contract.tasks``), and the
Idempotency-Key's reservation. So a batch exists whole or not at all, and a worker never sees
part of one. Every item is validated before anything is written: one bad item is a 422 that
names it, and nothing is queued.

Counting and ``batch.completed`` happen where items end (``diffq.app.contract.batches``).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import WatchError

from diffq.app.contract import keys
from diffq.app.contract.batches import BatchRecord
from diffq.app.contract.records import BatchRef, JobRecord, ModelRecord, Webhook, utcnow
from diffq.app.contract.registry import ServedModel
from diffq.app.contract.tasks import FairQueue, Place, drop_many, enqueue_many, model_queue
from diffq.app.core import backpressure
from diffq.app.core.batch_items import BatchSpec
from diffq.app.core.batch_results import ItemView, archive
from diffq.app.core.batch_validation import one_model, shared_inputs, validated
from diffq.app.core.errors import BatchNotFoundError, FieldProblem, InvalidRequestError, QueueFullError
from diffq.app.core.idempotency import IdempotencyStore, KeyTakenError
from diffq.app.core.inputs import PreparedInputs, prepare_inputs
from diffq.app.core.jobs import JobService, _StoredImages
from diffq.app.schemas.jobs import JobCreate
from diffq.app.settings import Settings
from diffq.app.webhooks.urls import AllowList, check_url

log = logging.getLogger(__name__)

PRIORITIES = ("high", "normal", "low")
#: Items read per Redis round trip when listing, exporting or zipping.
CHUNK = 500


@dataclass(frozen=True)
class BatchView:
    record: BatchRecord
    queued: int
    running: int
    eta_seconds: float | None
    expires_at: float | None

    @property
    def status(self) -> Literal["in_progress", "completed", "canceling", "canceled"]:
        if self.record.completed_at is not None:
            return "canceled" if self.record.canceled_at is not None else "completed"
        return "canceling" if self.record.canceled_at is not None else "in_progress"


class BatchService:
    """The operations behind ``/v1/batches``, on top of ``JobService``."""

    def __init__(self, jobs: JobService) -> None:
        self.jobs = jobs
        self.redis = jobs.redis
        self.settings: Settings = jobs.settings
        self.caller = jobs.caller

    # -- submitting ---------------------------------------------------------------------------

    def submit(self, spec: BatchSpec, batch_id: str | None = None, idempotency: Any = None) -> BatchView:
        """Validate every item, then write the batch and all its jobs in one ``MULTI``."""
        items = validated(spec, self.settings)
        served = self.jobs._served(one_model(items))
        model = served.model
        self._check_room(model.name, len(items), len(served.workers))
        webhook = Webhook.model_validate({"url": spec.webhook["url"]}) if spec.webhook else None
        item_hook = (
            Webhook.model_validate({"url": spec.webhook["url"], "events": spec.webhook["item_events"]})
            if spec.webhook and spec.webhook.get("item_events")
            else None
        )
        for url in {hook.url for hook in (webhook, item_hook) if hook} | {b.webhook.url for _, b in items if b.webhook}:
            check_url(url, AllowList.from_settings(self.settings))  # resolves DNS: once per distinct URL
        batch_id = idempotency.job_id if idempotency is not None else (batch_id or uuid.uuid4().hex)
        records, ttl = self._records(items, served, spec, batch_id, item_hook)
        rank = max(self.caller.priority_rank, PRIORITIES.index(spec.priority))
        retention = max((r.request.retention_seconds or 0) for r in records)
        batch = BatchRecord(
            id=batch_id,
            owner=self.caller.owner,
            model=model.name,
            total=len(records),
            created_at=time.time(),
            priority=PRIORITIES[rank],
            retention=retention,
            webhook=webhook,
            metadata=spec.metadata,
        )
        self._write(batch, records, ttl, Place(self.caller.scope, rank, ttl), idempotency)
        log.info("batch %s: %d jobs queued on model %s", batch_id, len(records), model.name)
        return BatchView(
            record=batch,
            queued=len(records),
            running=0,
            eta_seconds=self._eta(model.name, len(records), len(served.workers)),
            expires_at=batch.created_at + ttl,
        )

    def submit_once(self, key: str, fingerprint: str, spec: BatchSpec) -> tuple[BatchView, bool]:
        """``submit`` under an Idempotency-Key, as ``JobService.submit_once`` does for one job."""
        store = IdempotencyStore(self.redis, self.settings.idempotency_ttl)
        scope = f"{self.caller.owner or ''}\nbatches"
        while True:
            existing = store.lookup(key, fingerprint, scope=scope)
            if existing is not None:
                return self.get(existing.job_id), True
            try:
                return self.submit(spec, idempotency=store.entry(key, fingerprint, uuid.uuid4().hex, scope)), False
            except (KeyTakenError, WatchError):
                continue

    def _records(
        self,
        items: list[tuple[str, JobCreate]],
        served: ServedModel,
        spec: BatchSpec,
        batch_id: str,
        item_hook: Webhook | None,
    ) -> tuple[list[JobRecord], int]:
        """Each item's job record, built by ``JobService.build``, or made from the record of the item
        before it where that item differs at most in prompt and seed (``JobService.build_like``);
        shared inputs prepared once per distinct use. A refusal names the item. Input images are
        stored only once all have passed."""
        records, pngs, ttl = [], [], 0
        cache: dict[tuple[Any, ...], PreparedInputs] = {}
        wheres = [raw.where for raw in spec.items]
        last: tuple[JobCreate, JobRecord] | None = None
        for n, (custom_id, body) in enumerate(items):
            if item_hook is not None and body.webhook is None:
                body = body.model_copy(update={"webhook": item_hook})
            ref = BatchRef(id=batch_id, index=n, custom_id=custom_id)
            try:
                inputs = shared_inputs(body, spec, served.model, cache, self._prepare)
                record = self.jobs.build_like(last[1], last[0], body, ref) if last is not None else None
                if record is None:
                    record, item_ttl = self.jobs.build(
                        body, {}, served, None, inputs=inputs, store_inputs=False, batch=ref
                    )
                    last, ttl = (body, record), max(ttl, item_ttl)
            except InvalidRequestError as error:
                raise InvalidRequestError(
                    [FieldProblem(f"{wheres[n]}.{p.field}", p.message) for p in error.problems]
                ) from None
            records.append(record)
            pngs.append(inputs.pngs if inputs is not None else {})
        for n, files in enumerate(pngs):
            if files:
                records[n] = self.jobs.store_inputs(records[n], files, ttl)
        return records, ttl

    def _prepare(self, body: JobCreate, files: dict[str, bytes], model: ModelRecord) -> PreparedInputs:
        return prepare_inputs(body, files, model, self.settings, _StoredImages(self.jobs), self.caller.can_see)

    def zip_chunks(self, batch_id: str) -> Iterator[bytes]:
        """``images.zip`` as it is written (``batch_results.archive``); the batch is checked first."""
        self._record(batch_id)
        return archive(self.each_item(batch_id), self.jobs.image_bytes)

    def _check_room(self, model: str, count: int, workers: int) -> None:
        limit = backpressure.max_depth(self.settings, model)
        if limit is None:
            return
        depth = backpressure.queued(self.redis, model)
        if depth + count > limit:
            raise QueueFullError(model, depth, backpressure.estimated_wait(self.redis, model, depth, workers))

    def _write(self, batch: BatchRecord, records: list[JobRecord], ttl: int, place: Place, idempotency: Any) -> None:
        """One ``MULTI``: the batch, its items list, and every item's RQ job, record and ``queued`` event."""
        queue = model_queue(batch.model, self.redis, place)
        ids = [record.id for record in records]
        with self.redis.pipeline() as pipe:
            if idempotency is not None:
                idempotency.write(pipe)  # WATCH the key, then the MULTI begins with its SET
            else:
                pipe.multi()
            pipe.hset(keys.batch(batch.id), mapping=batch.to_hash())
            pipe.expire(keys.batch(batch.id), ttl)
            for start in range(0, len(ids), 5000):
                pipe.rpush(keys.batch_items(batch.id), *ids[start : start + 5000])
            pipe.expire(keys.batch_items(batch.id), ttl)
            self.jobs.store.create_many(records, ttl, pipe)  # before enqueueing: no worker meets a missing record
            assert isinstance(queue, FairQueue)  # model_queue with a place
            enqueue_many(queue, ids, self.settings, pipeline=pipe)
            index = keys.owner_batches(self.caller.scope)
            pipe.zadd(index, {batch.id: batch.created_at})
            pipe.expire(index, ttl)
            pipe.execute()

    # -- reading ------------------------------------------------------------------------------

    def get(self, batch_id: str) -> BatchView:
        """The batch now: its counters, and how many of its unended items are running."""
        record = self._record(batch_id)
        ids = self._ids(batch_id) if record.ended < record.total else []
        running = sum(1 for score in self.redis.zmscore(keys.RUNNING, ids) if score is not None) if ids else 0
        unended = record.total - record.ended
        workers = len(next((s.workers for s in self.jobs.registry.served_models() if s.model.name == record.model), []))
        # As the keys' TTLs are set: at creation (the items' lifetime), and by the last item's end.
        expires = (
            record.completed_at + record.retention
            if record.completed_at is not None
            else record.created_at + max(self.settings.job_ttl, record.retention)
        )
        return BatchView(
            record=record,
            queued=max(0, unended - running),
            running=running,
            eta_seconds=self._eta(record.model, unended, workers) if unended else None,
            expires_at=expires,
        )

    def recent(self, limit: int) -> list[BatchView]:
        """The caller's newest batches that still exist, newest first."""
        index = keys.owner_batches(self.caller.scope)
        ids = [i.decode() for i in self.redis.zrevrange(index, 0, limit * 2)]
        views = []
        for batch_id in ids:
            try:
                views.append(self.get(batch_id))
            except BatchNotFoundError:
                self.redis.zrem(index, batch_id)
            if len(views) == limit:
                break
        return views

    def items(self, batch_id: str, offset: int, limit: int) -> list[ItemView]:
        """Items ``offset`` to ``offset + limit`` in item order."""
        self._record(batch_id)
        ids = [i.decode() for i in self.redis.lrange(keys.batch_items(batch_id), offset, offset + limit - 1)]
        return self._views(ids, offset)

    def each_item(self, batch_id: str) -> Iterator[ItemView]:
        """Every item, read ``CHUNK`` at a time (for results.jsonl and images.zip)."""
        self._record(batch_id)
        offset = 0
        while True:
            ids = [i.decode() for i in self.redis.lrange(keys.batch_items(batch_id), offset, offset + CHUNK - 1)]
            if not ids:
                return
            yield from self._views(ids, offset)
            offset += len(ids)

    def _views(self, ids: list[str], offset: int) -> list[ItemView]:
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))
            found = pipe.execute()
        views = []
        for n, (job_id, fields) in enumerate(zip(ids, found, strict=True)):
            record = JobRecord.from_hash(fields) if fields else None
            custom_id = record.batch.custom_id if record is not None and record.batch is not None else str(offset + n)
            views.append(ItemView(index=offset + n, custom_id=custom_id, job_id=job_id, record=record))
        return views

    def _record(self, batch_id: str) -> BatchRecord:
        fields = self.redis.hgetall(keys.batch(batch_id)) if _is_id(batch_id) else {}
        if not fields:
            raise BatchNotFoundError(batch_id)
        record = BatchRecord.from_hash(fields)
        if not self.caller.can_see(record.owner):
            raise BatchNotFoundError(batch_id)
        return record

    def _ids(self, batch_id: str) -> list[str]:
        return [i.decode() for i in self.redis.lrange(keys.batch_items(batch_id), 0, -1)]

    def _eta(self, model: str, unended: int, workers: int) -> float | None:
        durations = self.redis.lrange(keys.model_durations(model), 0, -1)
        if not durations:
            return None
        mean = sum(float(d) for d in durations) / len(durations)
        return round(unended / max(1, workers) * mean, 2)

    # -- canceling and deleting ---------------------------------------------------------------

    def cancel(self, batch_id: str) -> BatchView:
        """Cancel every unended item: queued ones never run, running ones stop at their next step."""
        record = self._record(batch_id)
        if record.canceled_at is None:
            self.redis.hset(keys.batch(batch_id), "canceled_at", json.dumps(time.time()))
        ids = self._ids(batch_id)
        finished = utcnow().isoformat()
        canceled: list[str] = []
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            results = self.jobs.store.cancel_many(chunk, finished)
            canceled += [job_id for job_id, result in zip(chunk, results, strict=True) if result == 1]
        drop_many(model_queue(record.model, self.redis), canceled)
        log.info("batch %s canceled: %d queued items canceled", batch_id, len(canceled))
        return self.get(batch_id)

    def delete(self, batch_id: str) -> None:
        """Remove the batch, its items and their images; running items stop at their next step."""
        record = self._record(batch_id)
        ids = self._ids(batch_id)
        drop_many(model_queue(record.model, self.redis), ids)
        for start in range(0, len(ids), CHUNK):
            self.jobs.store.delete_many(ids[start : start + CHUNK])
        for job_id in ids:
            try:
                self.jobs.results.delete_job(job_id)
            except Exception as error:  # noqa: BLE001 - the records are gone: the store sweep removes the rest
                log.warning("batch %s: objects of job %s stay until the store sweep (%s)", batch_id, job_id, error)
                break
        self.redis.delete(keys.batch(batch_id), keys.batch_items(batch_id))
        self.redis.zrem(keys.owner_batches(self.caller.scope), batch_id)


def _is_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)
