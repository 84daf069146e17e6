"""Waits: requests that hold a blocking Redis read while a job runs (long polls ``?wait=``, event
streams, ``POST /v1/images/generations``).

Each wait is admitted twice, cheaply, before its first blocking read:

- per API key, across every API process: a claim in the key's waits (``max_waits``; an event
  stream also in its streams, ``max_event_streams``), lapsing unless renewed so a crashed process
  holds nothing. Over it: ``429 too_many_waits`` (or ``too_many_streams``), naming the limit.
- per API process: no more waits than its blocking pool has connections
  (``redis_wait_connections``). Over it: ``503 server_busy``.

So one key's waits never take the connections another key's reads or waits need. While auth is
off there is no key, and only the per-process limit applies.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi.concurrency import run_in_threadpool
from redis import Redis

from diffq.app.auth.caller import Caller
from diffq.app.auth.quotas import STREAM_CLAIM_SECONDS, Claim, Quotas
from diffq.app.contract import keys
from diffq.app.core.errors import ServerBusyError, TooManyStreamsError, TooManyWaitsError


@dataclass
class WaitCount:
    """Waits open in this process (the event loop is one thread: a plain counter)."""

    most: int
    open: int = 0


@dataclass
class WaitSlot:
    """An admitted wait; ``renew`` keeps its claim alive while it lasts."""

    quotas: Quotas | None = None
    claim: Claim | None = None
    renewed_at: float = field(default_factory=time.monotonic)

    async def renew(self) -> None:
        """Renew the claim once a third of its life has passed (not at every event)."""
        if self.quotas is None or self.claim is None:
            return
        if time.monotonic() - self.renewed_at >= STREAM_CLAIM_SECONDS / 3:
            await run_in_threadpool(self.quotas.renew_claim, self.claim)
            self.renewed_at = time.monotonic()


@asynccontextmanager
async def hold_wait(count: WaitCount, redis: Redis, caller: Caller, *, stream: bool = False) -> AsyncIterator[WaitSlot]:
    """Admit one wait of ``caller`` (see the module docstring) in this process's ``count``, its claim
    written through ``redis``; held until the block exits. Routes reach it through
    ``diffq.app.api.waiting.Waiter.admit``."""
    if count.open >= count.most:
        raise ServerBusyError(
            f"this API process already serves {count.most} waits, its limit "
            "(DIFFQ_REDIS_WAIT_CONNECTIONS); retry, or poll without wait"
        )
    count.open += 1
    slot = WaitSlot()
    try:
        if caller.key is not None:
            slot.quotas = Quotas(redis, caller.scope)
            caps = {keys.owner_waits(caller.scope): caller.max_waits}
            if stream:
                caps[keys.owner_streams(caller.scope)] = caller.max_event_streams
            claimed = await run_in_threadpool(slot.quotas.open_claim, caps)
            if isinstance(claimed, str):
                if claimed == keys.owner_streams(caller.scope):
                    raise TooManyStreamsError(caller.max_event_streams)
                raise TooManyWaitsError(caller.max_waits)
            slot.claim = claimed
        yield slot
    finally:
        count.open -= 1
        if slot.quotas is not None and slot.claim is not None:
            await run_in_threadpool(slot.quotas.close_claim, slot.claim)
