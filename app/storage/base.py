"""The interface every result store backend meets, and the two ways it can fail.

A backend stores opaque bytes under keys made by ``diffq.app.storage.objects``; it never
interprets them. Writes are whole or absent (no reader ever sees half an object).
``StorageUnavailableError`` is transient (retry, or answer 503); ``StorageConfigError``
is a deployment mistake, and names the setting to fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol


class StorageUnavailableError(Exception):
    """The store cannot be reached now; the same call may succeed later."""


class StorageConfigError(Exception):
    """The store as configured cannot work (missing bucket, bad credentials, read-only directory);
    the message names the setting to fix."""


@dataclass(frozen=True)
class ListedObject:
    """One stored object: its key (as given to ``put``) and when it was last written (unix time)."""

    key: str
    modified: float


class ResultStore(Protocol):
    """Bytes by key. ``ttl`` is a hint only the ``redis`` backend uses (objects expire with the job);
    the others rely on ``diffq.app.storage.sweep`` to remove what no live job references."""

    name: str

    def put(self, key: str, data: bytes, content_type: str, ttl: int) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def delete(self, keys: Iterable[str]) -> None: ...

    def delete_job(self, job_id: str) -> None:
        """Every object of a job, whichever attempt wrote it."""
        ...

    def list(self) -> Iterator[ListedObject]:
        """Every object under this store's prefix (the sweeper's view)."""
        ...

    def signed_url(self, key: str, seconds: int, content_type: str) -> str | None:
        """A GET URL straight to the object, valid ``seconds``; ``None`` if the backend cannot sign."""
        ...

    def public_path(self, key: str) -> str:
        """The object's path under a public base URL (a CDN in front of the bucket or directory)."""
        ...

    def ping(self) -> bool:
        """Whether the store answers now (cheap: for ``/readyz``)."""
        ...

    def check(self) -> None:
        """Write, read back and remove a probe object; raises ``StorageConfigError`` naming the
        setting to fix, or ``StorageUnavailableError`` if the store is down."""
        ...
