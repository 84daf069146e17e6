"""worker/stops.py: a cancel or delete heard by pub/sub stops the run at its next step, and the
steps in between cost no Redis command."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from redis import Redis

from diffq.app.contract.records import JobParams, JobRecord
from diffq.app.contract.store import JobStore, WriteResult
from diffq.worker.progress import JobAbandonedError, JobCanceledError, ProgressReporter
from diffq.worker.stops import StopListener

PARAMS = JobParams(prompt="p", width=16, height=16, steps=100, guidance_scale=7.5, scheduler="ddim", seed=1)


class FakeClock:
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


@pytest.fixture
def stops(redis: Redis) -> Iterator[StopListener]:
    listener = StopListener(redis)
    listener.start()
    deadline = time.monotonic() + 10
    while not listener.live:
        assert time.monotonic() < deadline, "the listener never subscribed"
        time.sleep(0.01)
    yield listener
    listener.stop()


def commands(redis: Redis) -> int:
    """Commands the server has run so far, less the INFO calls that ask."""
    stats = redis.info("commandstats")
    return sum(value["calls"] for name, value in stats.items() if name != "cmdstat_info")


def wait_heard(stops: StopListener, job_id: str) -> None:
    deadline = time.monotonic() + 5
    while job_id not in stops._heard:
        assert time.monotonic() < deadline, f"{job_id} was never heard"
        time.sleep(0.005)


def test_quiet_steps_cost_no_redis_command(store: JobStore, redis: Redis, stops: StopListener) -> None:
    clock = FakeClock()
    reporter = ProgressReporter(store, "j", "t", interval=10.0, clock=clock, stops=stops)
    reporter(1, 100, None)  # the first step reads the record and writes progress
    before = commands(redis)
    for step in range(2, 50):
        clock.now += 0.01
        reporter(step, 100, None)
    assert commands(redis) == before


def test_a_cancel_is_heard_and_stops_the_run_at_the_next_step(store: JobStore, redis: Redis,
                                                             stops: StopListener) -> None:
    reporter = ProgressReporter(store, "j", "t", interval=10.0, clock=FakeClock(), stops=stops)
    reporter(1, 100, None)
    store.cancel("j", "2030-01-01T00:00:00+00:00")
    wait_heard(stops, "j")
    with pytest.raises(JobCanceledError):
        reporter(2, 100, None)


def test_a_delete_of_a_running_job_is_heard_and_stops_the_run(store: JobStore, stops: StopListener) -> None:
    reporter = ProgressReporter(store, "j", "t", interval=10.0, clock=FakeClock(), stops=stops)
    reporter(1, 100, None)
    assert store.delete("j")
    wait_heard(stops, "j")
    with pytest.raises(JobAbandonedError) as stopped:
        reporter(2, 100, None)
    assert stopped.value.result is WriteResult.MISSING


def test_without_a_subscription_every_step_reads_the_record(store: JobStore, redis: Redis) -> None:
    idle = StopListener(redis)  # never started: not live
    reporter = ProgressReporter(store, "j", "t", interval=10.0, clock=FakeClock(), stops=idle)
    reporter(1, 100, None)
    store.cancel("j", "2030-01-01T00:00:00+00:00")  # published to no one
    with pytest.raises(JobCanceledError):
        reporter(2, 100, None)


def test_a_resubscribed_listener_makes_every_run_read_its_record_once(store: JobStore, stops: StopListener) -> None:
    reporter = ProgressReporter(store, "j", "t", interval=10.0, clock=FakeClock(), stops=stops)
    reporter(1, 100, None)
    store.cancel("j", "2030-01-01T00:00:00+00:00")
    wait_heard(stops, "j")
    stops._heard.clear()  # as if the message had been lost with the connection ...
    stops.generation += 1  # ... and the listener had subscribed again
    with pytest.raises(JobCanceledError):
        reporter(2, 100, None)


def test_a_run_whose_claim_read_its_record_under_the_listener_skips_the_first_steps_read(
    store: JobStore, redis: Redis, stops: StopListener
) -> None:
    """The runner notes the listener's generation before the claim (which reads the record):
    the first step then reads it again only if the listener has subscribed again since, or
    heard a stop for the job."""
    reporter = ProgressReporter(store, "j", "t", interval=10.0, clock=FakeClock(), stops=stops, seen=stops.generation)
    before = commands(redis)
    reporter(1, 100, None)
    assert commands(redis) == before

    stale = ProgressReporter(store, "j", "t", interval=10.0, clock=FakeClock(), stops=stops, seen=stops.generation - 1)
    store.cancel("j", "2030-01-01T00:00:00+00:00")
    wait_heard(stops, "j")
    stops._heard.clear()  # lost with the connection, which has subscribed again since the claim
    with pytest.raises(JobCanceledError):
        stale(1, 100, None)

    heard = ProgressReporter(store, "j", "t", interval=10.0, clock=FakeClock(), stops=stops, seen=stops.generation)
    store.cancel("j", "2030-01-01T00:00:00+00:00")
    wait_heard(stops, "j")
    with pytest.raises(JobCanceledError):
        heard(1, 100, None)
