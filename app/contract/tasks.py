"""The one task workers run, and the RQ queue each model uses: names kept here for the modules that
import them from this path. They live in ``diffq.app.contract.rq_adapter``, with every other touch of RQ.
"""

from __future__ import annotations

from diffq.app.contract.rq_adapter import (
    ENQUEUE_CHUNK,
    FINISHED_TTL,
    QUEUE_PREFIX,
    TASK,
    FairQueue,
    Place,
    cancel_queued,
    drop_many,
    end_lost,
    enqueue,
    enqueue_many,
    forget,
    intermediate_key,
    mark_requeued,
    model_queue,
    queue_name,
    rq_job_fields,
    rq_status,
    started_ids,
)

__all__ = [
    "ENQUEUE_CHUNK",
    "FINISHED_TTL",
    "QUEUE_PREFIX",
    "TASK",
    "FairQueue",
    "Place",
    "cancel_queued",
    "drop_many",
    "end_lost",
    "enqueue",
    "enqueue_many",
    "forget",
    "intermediate_key",
    "mark_requeued",
    "model_queue",
    "queue_name",
    "rq_job_fields",
    "rq_status",
    "started_ids",
]
