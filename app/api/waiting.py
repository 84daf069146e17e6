"""Waiting for a job's change while a request is open: the one way the API does it, for long polls
(``GET /v1/jobs/{id}?wait=``), event streams (``GET /v1/jobs/{id}/events``) and the synchronous
endpoints (OpenAI's image generations, edits and variations; A1111's ``/sdapi/v1``).

A route gets the process's ``Waiter`` through the ``diffq.app.deps.WaiterDep`` dependency (never from
``app.state``), is admitted by it (``Waiter.admit``: ``diffq.app.api.waits``, 429 or 503 before any
blocking read) and then follows the job with the ``Wait`` it is given:

- ``Wait.follow``: the job's events as they are published. It blocks on the waits' own pool
  (``diffq.app.api.redis_clients``) for at most ``POLL_SECONDS`` at a time, so a hang-up or the deadline
  is noticed within one read; after ``RECHECK_SECONDS`` without an event it yields an empty batch,
  the caller's cue to re-read the job (RQ may end a job without an event).
- ``Wait.until_ended``: the job once it has ended, or as it is when the time is up; no polling of
  the record between events.
- ``Wait.result``: the same for a synchronous endpoint, which cancels the job if the client hangs
  up: nobody would read its result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from diffq.app.api.waits import WaitCount, WaitSlot, hold_wait
from diffq.app.auth.caller import Caller
from diffq.app.contract import events, keys
from diffq.app.core.errors import DiffqError, JobNotFoundError
from diffq.app.core.jobs import JobService, JobView

log = logging.getLogger(__name__)

#: Longest single blocking read, in seconds: how soon a hang-up or a deadline is noticed.
POLL_SECONDS = 1.0
#: Seconds without an event after which the job is re-read (RQ may end a job silently).
RECHECK_SECONDS = 5.0
#: Most events one read returns.
READ_COUNT = 100

#: Asks whether the client has hung up (``Request.is_disconnected``).
Disconnected = Callable[[], Awaitable[bool]]


class WaitTimedOut(Exception):
    """The job had not ended when the wait's time was up; it goes on."""

    def __init__(self, view: JobView, timeout: float) -> None:
        super().__init__(f"job {view.record.id} still {view.status.value} after {timeout:g} s")
        self.view, self.timeout = view, timeout


@dataclass(frozen=True)
class Waiter:
    """An API process's means of waiting: its Redis clients for it and its count of open waits.
    Built once in the app's lifespan; routes take it through ``diffq.app.deps.WaiterDep``."""

    redis: Redis  # the thread pool's client: admission claims (diffq.app.auth.quotas)
    quick: AsyncRedis  # short reads from the event loop
    blocking: AsyncRedis  # XREAD BLOCK only, redis_wait_connections of them
    count: WaitCount

    async def last_event_id(self, job_id: str) -> str:
        """The id of the job's newest event ("0" if none): follow from here to miss nothing after it."""
        return events.last_id_text(await self.quick.xrevrange(keys.events(job_id), count=1))

    @asynccontextmanager
    async def admit(self, caller: Caller, *, stream: bool = False) -> AsyncIterator[Wait]:
        """One admitted wait of ``caller`` (``diffq.app.api.waits``: 429/503 here), held until the block exits."""
        async with hold_wait(self.count, self.redis, caller, stream=stream) as slot:
            yield Wait(self, slot)


@dataclass
class Wait:
    """One admitted wait, following one job at a time."""

    waiter: Waiter
    slot: WaitSlot
    hung_up: bool = False  # set once ``follow`` has seen the client gone

    async def follow(
        self, job_id: str, after: str, *, deadline: float | None = None, disconnected: Disconnected | None = None
    ) -> AsyncGenerator[list[events.Event], None]:
        """The job's events after the id ``after``, a batch at a time as they are published, and an
        empty batch after each ``RECHECK_SECONDS`` without one. Ends at ``deadline`` (monotonic), or
        when ``disconnected`` says the client has gone (``hung_up`` is then set); otherwise it goes on
        until the caller stops."""
        quiet_since = time.monotonic()
        while True:
            await self.slot.renew()
            block = POLL_SECONDS
            if deadline is not None:
                block = min(block, deadline - time.monotonic())
                if block <= 0:
                    return
            if disconnected is not None and await disconnected():
                self.hung_up = True
                return
            reply = await self.waiter.blocking.xread(
                {keys.events(job_id): after}, block=max(1, int(block * 1000)), count=READ_COUNT
            )
            if reply:
                batch = events.parse(reply[0][1])
                after, quiet_since = batch[-1].id, time.monotonic()
                yield batch
            elif time.monotonic() - quiet_since >= RECHECK_SECONDS:
                quiet_since = time.monotonic()
                yield []

    async def until_ended(
        self,
        jobs: JobService,
        job_id: str,
        timeout: float,
        *,
        disconnected: Disconnected | None = None,
        known: tuple[str, JobView] | None = None,
    ) -> JobView | None:
        """The job once it has ended; ``None`` if the client hung up first. Raises ``WaitTimedOut``
        (carrying the job as it is then) or ``JobNotFoundError`` if the job is deleted meanwhile.
        ``known``: the job's newest event id and the job as read after it, if the caller has them."""
        deadline = time.monotonic() + timeout
        if known is not None:
            after, view = known
        else:
            after = await self.waiter.last_event_id(job_id)
            view = await run_in_threadpool(jobs.get, job_id)  # read after `after`: nothing ends unseen
        if view.status.is_terminal:
            return view
        async with aclosing(self.follow(job_id, after, deadline=deadline, disconnected=disconnected)) as batches:
            async for batch in batches:
                if not batch or any(event.is_terminal for event in batch):
                    view = await run_in_threadpool(jobs.get, job_id)
                    if view.status.is_terminal:
                        return view
        if self.hung_up:
            return None
        view = await run_in_threadpool(jobs.get, job_id)  # as it is now, progress included
        if view.status.is_terminal:
            return view
        raise WaitTimedOut(view, timeout)

    async def result(self, request: Request, jobs: JobService, job_id: str, timeout: float) -> JobView | None:
        """``until_ended`` for a synchronous endpoint: if the client hangs up first, the job is
        canceled (nobody would read its result) and the answer is ``None``."""
        view = await self.until_ended(jobs, job_id, timeout, disconnected=request.is_disconnected)
        if view is None:
            log.info("client hung up while waiting; canceling job %s", job_id, extra={"job_id": job_id})
            try:
                await run_in_threadpool(jobs.cancel, job_id)
            except DiffqError:
                pass  # it ended meanwhile, or was deleted
        return view


__all__ = ["POLL_SECONDS", "RECHECK_SECONDS", "JobNotFoundError", "Wait", "WaitTimedOut", "Waiter"]
