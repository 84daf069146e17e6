"""Cross-request batching: queued jobs that can share a pipeline call run as one batch.

After RQ hands the worker a job (the *lead*), the runner asks ``Company.take`` for up to
``batch_max - 1`` more jobs from the same model queue whose requests share the engine's batch
key (size, steps, scheduler, guidance scale, mode, strength, LoRA adapters and weights; for SDXL-style models
also whether the negative prompt is empty: ``diffq.model.engine.Engine._batch_groups``), waiting at most
``batch_wait_ms`` for them to arrive, unless the queue is empty at the first look (one client
sending jobs one at a time never waits). Each one taken is

- taken off RQ's queue list and claimed in diffq in one atomic step
  (``JobStore.claim_queued``) with its own attempt token: two workers never take the same job,
  and if this worker dies the sweeper finds it in ``diffq:running`` and queues it again like any
  claimed job (``tasks.mark_requeued`` clears the RQ execution made below);
- marked started in RQ the way RQ marks the job it dequeued itself (an execution in the
  queue's started registry, status ``started``, this worker's name), so the API never sees a
  queued job that is in no queue, and a client's DELETE leaves the RQ job to its worker.

When the lead's RQ job has ended, ``DiffqWorker`` ends each taken job in RQ through RQ's own
success handling (or failure handling, if the lead's run itself failed and the taken job never
got a result), one after the other, as if RQ had run it: ``finished``, a result, the finished
registry, the worker's counters (``diffq.app.contract.rq_adapter.end_execution``). RQ's bookkeeping is
secondary: clients read diffq's record alone.

During the run each job has its own progress reporter (one Redis round trip, at the steps
where any job of the batch has a write due or must read its record, checks them all and writes
what is due: ``JobStore.step``). A job canceled
mid-batch ends ``canceled`` at the next step and the others go on; its rows are computed to the
end of the call and dropped. (Stopping the call and requeueing the others would throw away their
progress and delay them by a whole run, for the sake of the canceled job's share of the
remaining compute.) A deleted or re-attempted job is dropped the same way; once no job of the
batch is left, the call stops. A shutdown past its grace hands every job of the batch back.

Compatibility is decided from the job records' resolved parameters (no image decoding); the
engine groups the validated requests again with its own key, so a job that does not really fit
runs in a second group of the same call instead of changing anybody's pixels.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffq.app.contract import keys
from diffq.app.contract.records import JobParams, JobRecord
from diffq.app.contract.rq_adapter import Execution, Job, Queue, fetch_job, start_execution
from diffq.app.contract.store import JobStore
from diffq.worker.allowlist import refusal_reason

if TYPE_CHECKING:
    from diffq.app.contract.rq_adapter import BaseWorker
    from diffq.model.engine import Engine

log = logging.getLogger(__name__)

#: Queue entries looked at per pass when searching for company (from the front of the queue).
SCAN = 64


def batch_key(params: JobParams, empty_negative_is_special: bool) -> tuple:
    """The fields that must be equal for two jobs to share one pipeline call (the engine's key)."""
    key: tuple = (
        params.width,
        params.height,
        params.steps,
        params.scheduler,
        float(params.guidance_scale),
        params.mode.value,
        params.strength,
        tuple((lora.name, float(lora.weight)) for lora in params.loras),
    )
    if empty_negative_is_special:
        key += (params.negative_prompt == "",)
    return key


def engine_batch_key(engine: Engine) -> Callable[[JobParams], tuple]:
    """``batch_key`` for this engine's model (SDXL encodes an empty negative prompt apart)."""
    special = bool(getattr(engine, "_empty_negative_is_special", True))
    return lambda params: batch_key(params, special)


@dataclass
class Taken:
    """A queued job added to the running batch: claimed in diffq, started in RQ."""

    record: JobRecord
    token: str
    rq_job: Job
    execution: Execution


class Company:
    """Finds and takes queued jobs that can join the lead job's batch, for one worker and queue.

    ``taken`` collects what ``take`` took during the lead's run; the worker ends them in RQ after.
    """

    def __init__(
        self,
        worker: BaseWorker,
        queue: Queue,
        store: JobStore,
        worker_id: str,
        key: Callable[[JobParams], tuple],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.worker = worker
        self.queue = queue
        self.store = store
        self.redis = store.redis
        self.worker_id = worker_id
        self.key = key
        self.clock = clock
        self.taken: list[Taken] = []

    def take(self, lead: JobRecord, limit: int, wait: float) -> list[Taken]:
        """Take up to ``limit`` queued jobs that fit ``lead``'s batch, in queue order; while fewer
        are found, look again until ``wait`` seconds have passed. With nothing at all queued at
        the first look, none is waited for: a lone job starts at once."""
        if limit < 1:
            return []
        deadline = self.clock() + wait
        wanted = self.key(lead.request)
        looked_at: set[str] = {lead.id}
        found: list[Taken] = []
        while True:
            queued, compatible = self._compatible(wanted, looked_at)
            if not queued and not found:
                break  # nothing else is queued: no company is on its way, so no wait for it
            for job_id in compatible:
                taken = self._take(job_id, lead.id)
                if taken is not None:
                    found.append(taken)
                    if len(found) >= limit:
                        break
            remaining = deadline - self.clock()
            if len(found) >= limit or remaining <= 0:
                break
            time.sleep(min(remaining, 0.001))
        self.taken.extend(found)
        return found

    def _compatible(self, wanted: tuple, looked_at: set[str]) -> tuple[bool, list[str]]:
        """Whether any job is queued, and the ids near the front of the queue, not looked at
        before, whose requests have key ``wanted``."""
        ids = [raw.decode() for raw in self.redis.lrange(self.queue.key, 0, SCAN - 1)]
        fresh = [job_id for job_id in ids if job_id not in looked_at]
        if not fresh:
            return bool(ids), []
        looked_at.update(fresh)
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in fresh:
                pipe.hget(keys.job(job_id), "request")
            requests = pipe.execute()
        compatible = []
        for job_id, raw in zip(fresh, requests, strict=True):
            if raw is None:
                continue  # deleted: RQ's own path drops it
            try:
                params = JobParams.model_validate(json.loads(raw))
            except ValueError:
                continue  # unreadable: RQ's own path fails it
            if self.key(params) == wanted:
                compatible.append(job_id)
        return True, compatible

    def _take(self, job_id: str, lead_id: str) -> Taken | None:
        rq_job = fetch_job(self.worker, job_id)
        if rq_job is None or refusal_reason(rq_job) is not None:
            return None  # left on the queue: RQ dequeues it and drops or refuses it as usual
        token = uuid.uuid4().hex
        record = self.store.claim_queued(job_id, self.queue.key, self.worker_id, token)
        if record is None:
            return None  # another worker took it, or it ended meanwhile
        execution = start_execution(self.worker, rq_job)  # as RQ marks the job it dequeued
        log.info("job %s: joins the batch of job %s", job_id, lead_id)
        return Taken(record=record, token=token, rq_job=rq_job, execution=execution)
