"""Job statuses, and the one place where RQ's statuses are mapped to them."""

from __future__ import annotations

from enum import Enum

from rq.job import JobStatus as RQStatus


class JobStatus(str, Enum):
    """Where a job is in its life: ``queued → running → succeeded | failed | canceled``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_terminal(self) -> bool:
        """A terminal job never changes status again."""
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})

_FROM_RQ: dict[RQStatus, JobStatus] = {
    RQStatus.CREATED: JobStatus.QUEUED,
    RQStatus.QUEUED: JobStatus.QUEUED,
    RQStatus.DEFERRED: JobStatus.QUEUED,
    RQStatus.SCHEDULED: JobStatus.QUEUED,
    RQStatus.STARTED: JobStatus.RUNNING,
    RQStatus.FINISHED: JobStatus.SUCCEEDED,
    RQStatus.FAILED: JobStatus.FAILED,
    RQStatus.STOPPED: JobStatus.CANCELED,
    RQStatus.CANCELED: JobStatus.CANCELED,
}


def from_rq(status: RQStatus | str | None) -> JobStatus | None:
    """diffq's status for an RQ job status; ``None`` when RQ has no job (expired or deleted).

    This is the only mapping between the two vocabularies: everything that
    needs to read RQ's view of a job goes through here.
    """
    if status is None:
        return None
    return _FROM_RQ[RQStatus(status)]
