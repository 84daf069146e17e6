"""app/contract/status.py: the one mapping from RQ's statuses to diffq's."""

from __future__ import annotations

import pytest
from rq.job import JobStatus as RQStatus

from diffq.app.contract.status import JobStatus, from_rq


def test_every_rq_status_has_a_diffq_status() -> None:
    assert {status: from_rq(status) for status in RQStatus} == {
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


def test_raw_strings_and_missing_jobs() -> None:
    assert from_rq("started") is JobStatus.RUNNING
    assert from_rq(None) is None
    with pytest.raises(ValueError):
        from_rq("exploded")


def test_statuses_are_lowercase_strings_and_know_if_they_are_terminal() -> None:
    assert [s.value for s in JobStatus] == ["queued", "running", "succeeded", "failed", "canceled"]
    assert JobStatus("succeeded") == "succeeded"
    assert [s for s in JobStatus if s.is_terminal] == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED]
