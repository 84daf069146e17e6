"""worker/progress.py: throttled progress writes that also stop runs nobody wants any more."""

from __future__ import annotations

import pytest
from redis import Redis

from diffq.app.contract.records import JobParams, JobRecord
from diffq.app.contract.store import JobStore, WriteResult
from diffq.worker.progress import JobAbandonedError, ProgressReporter

PARAMS = JobParams(prompt="p", width=16, height=16, steps=100, guidance_scale=7.5, scheduler="ddim", seed=1)


class FakeClock:
    """Time that advances only when told, so throttling is tested exactly."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(redis: Redis) -> JobStore:
    store = JobStore(redis)
    store.create(JobRecord(id="j", model="tiny", request=PARAMS), ttl=100)
    store.claim("j", "w", "t")
    return store


def test_at_most_ten_writes_per_second_the_first_after_one_interval_and_the_last_step_kept_for_the_end(
    store: JobStore,
) -> None:
    clock = FakeClock()
    reporter = ProgressReporter(store, "j", "t", interval=0.1, clock=clock)

    for step in range(1, 101):  # 100 steps of 10 ms: one second
        clock.now += 0.01
        reporter(step, 100, None)
        if step == 9:  # 90 ms in: nothing written yet (the `running` event said the run began)
            assert reporter.writes == 0 and store.get("j").progress is None

    assert 9 <= reporter.writes <= 10
    written = store.get("j").progress
    assert written is not None and 90 <= written.step < 100  # throttled: the last step's own write skipped
    final = reporter.final_progress()  # ... and stored by the job's end (worker/runner.py)
    assert final is not None and (final["step"], final["total"], final["eta_seconds"]) == (100, 100, 0.0)


def test_every_step_is_written_without_throttle(store: JobStore) -> None:
    reporter = ProgressReporter(store, "j", "t", interval=0.0)
    for step in range(1, 6):
        reporter(step, 5, None)
    assert reporter.writes == 5


def test_a_deleted_job_stops_the_run(store: JobStore, redis: Redis) -> None:
    reporter = ProgressReporter(store, "j", "t", interval=0.0)
    reporter(1, 5, None)
    store.delete("j")

    with pytest.raises(JobAbandonedError) as stopped:
        reporter(2, 5, None)

    assert stopped.value.result is WriteResult.MISSING
    assert redis.keys("*") == []


def test_a_newer_attempt_stops_the_stale_run(store: JobStore) -> None:
    store.claim("j", "w2", "newer")
    with pytest.raises(JobAbandonedError) as stopped:
        ProgressReporter(store, "j", "t", interval=0.0)(1, 5, None)
    assert stopped.value.result is WriteResult.STALE
