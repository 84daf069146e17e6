"""How many input images an API process decodes at once, overall and per API key.

Decoding a large upload costs up to a second of CPU. Without a bound, one key sending many large
images at once takes every decode (and every thread) of the process, and everyone's uploads
wait behind it. ``DecodeGate`` admits a request with input images in two steps, both waited for
on the event loop (a waiting request holds no thread):

1. the key's own line: at most ``per_key`` of its requests decoding at once, and at most 8 times
   as many more waiting; beyond that ``429 too_many_uploads`` at once;
2. the process's decode slots (``most``), taken first come, first served.

A key thus holds at most ``per_key`` of the ``most`` slots, and another key's upload waits at most
for one decode to finish. While auth is off, the client's address stands in for the key.
Text-to-image requests never pass through the gate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from diffq.app.core.errors import TooManyUploadsError

#: Requests of one key that may wait for a decode, per decode it may run at once.
WAITING_PER_SLOT = 8


@dataclass
class _KeyLine:
    slots: asyncio.Semaphore
    users: int = 0  # decoding or waiting


@dataclass
class DecodeGate:
    """Decode slots of one API process; build it inside the running event loop (the lifespan)."""

    most: int
    per_key: int
    _all: asyncio.Semaphore = field(init=False)
    _lines: dict[str, _KeyLine] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._all = asyncio.Semaphore(self.most)

    @property
    def most_per_key(self) -> int:
        """Requests of one key decoding or waiting to, at most."""
        return self.per_key * (1 + WAITING_PER_SLOT)

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        """Hold one decode slot of ``key`` for the block; ``TooManyUploadsError`` if its line is full."""
        line = self._lines.setdefault(key, _KeyLine(asyncio.Semaphore(self.per_key)))
        if line.users >= self.most_per_key:
            raise TooManyUploadsError(self.most_per_key)
        line.users += 1
        try:
            async with line.slots, self._all:
                yield
        finally:
            line.users -= 1
            if line.users == 0:
                del self._lines[key]
