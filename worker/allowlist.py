"""The worker's allow-list: it executes diffq's task, with a job id, and nothing else.

Anyone who can write to Redis can put an RQ job on a diffq queue. RQ would
import and call whatever function such a job names; a diffq worker instead
checks the function name and arguments before importing anything, and fails
the RQ job without running it.
"""

from __future__ import annotations

import logging

from diffq.app.contract.records import ErrorCode, utcnow
from diffq.app.contract.rq_adapter import DeserializationError, Job
from diffq.app.contract.tasks import TASK
from diffq.worker import context

log = logging.getLogger(__name__)


class RefusedTaskError(Exception):
    """An RQ job on a diffq queue that is not diffq's task with a job id."""


def refusal_reason(job: Job) -> str | None:
    """Why ``job`` must not run, or ``None`` if it is exactly ``TASK(job.id)``."""
    try:
        func_name, args, kwargs = job.func_name, job.args, job.kwargs
    except DeserializationError as error:
        return f"its payload is not diffq's JSON ({error})"
    except Exception as error:  # whatever else a hand-made payload can break
        return f"its payload cannot be read ({type(error).__name__}: {error})"
    if func_name != TASK:
        return f"it names {func_name!r}; a diffq worker runs only {TASK!r}"
    if list(args) != [job.id] or kwargs:
        return f"its arguments must be exactly [job id] ({job.id!r}), got args={args!r} kwargs={kwargs!r}"
    return None


def _fail_record(job_id: str, reason: str) -> None:
    """A diffq job whose RQ job was tampered with ends ``failed``/``refused`` in its own record
    (the record alone says how a job ended), unless it has ended already."""
    current = context.current()
    values = {
        "status": "failed",
        "finished_at": utcnow().isoformat(),
        "error": {"code": ErrorCode.REFUSED.value, "message": f"refused RQ job {job_id}: {reason}"},
    }
    current.store.finish(
        job_id, None, values, [], job_ttl=current.settings.job_ttl, result_ttl=current.settings.result_ttl
    )


class AllowListedJob(Job):
    """RQ's job, checked against the allow-list before its function is imported or called."""

    def perform(self) -> object:
        reason = refusal_reason(self)
        if reason is not None:
            log.error("refused RQ job %s: %s", self.id, reason)
            _fail_record(self.id, reason)
            raise RefusedTaskError(f"refused RQ job {self.id}: {reason}")
        # RQ's perform, less its PERSIST of the job hash (one command a job): the hash keeps the job
        # TTL it was enqueued with, far longer than a run. Nor is the job pushed on RQ's stack of
        # current jobs: diffq's task never asks RQ for its current job (rq.get_current_job).
        self._result = self._execute()
        return self._result
