"""A finished run's objects: encoded, written to the result store with bounded retries, and
what the job record will say about them.

The objects of a run sit under its attempt token (``diffq.app.storage.objects``) and are written
before the guarded finish script; only a run whose token that script accepts gets its keys
into the record. So a stale run's upload is never served, and a run cut short leaves
only objects no record refers to, which the store sweeper removes. A store that stays
unreachable for ``store_retry`` seconds raises ``StorageUnavailableError``: the job then
fails ``storage_unavailable`` and no half-written result is ever referenced.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from PIL import Image

from diffq.app.contract.records import ImageRecord, JobRecord
from diffq.app.storage import objects
from diffq.app.storage.base import ResultStore, StorageUnavailableError
from diffq.worker.encoding import EncodedImage, encode_journey_frames

log = logging.getLogger(__name__)

#: First and longest wait between two tries of a store write, in seconds.
FIRST_WAIT, LONGEST_WAIT = 0.2, 5.0


@dataclass(frozen=True)
class StoredRun:
    """What a run wrote: the image records for the job record, and every key (to undo)."""

    images: list[ImageRecord]
    keys: list[str]


def with_retries(write: Callable[[], object], retry_seconds: float, what: str) -> None:
    """Call ``write()`` until it succeeds, backing off, for at most ``retry_seconds``."""
    deadline, wait = time.monotonic() + retry_seconds, FIRST_WAIT
    while True:
        try:
            write()
            return
        except StorageUnavailableError as error:
            if time.monotonic() + wait > deadline:
                raise StorageUnavailableError(
                    f"{what}: still unreachable after {retry_seconds:g} s: {error}"
                ) from error
            log.warning("result store unreachable writing %s (%s); retrying in %.1f s", what, error, wait)
            time.sleep(wait)
            wait = min(wait * 2, LONGEST_WAIT)


def store_run(
    store: ResultStore,
    record: JobRecord,
    token: str,
    images: list[tuple[Image.Image, int]],
    encode: Callable[[Image.Image, int], EncodedImage],
    journeys: list[list[Image.Image]],
    ttl: int,
    retry_seconds: float,
) -> StoredRun:
    """Encode (``encode(image, seed)``: the worker's marks and format) and write a run's images
    (``(image, seed)``) and journeys; raises ``StorageUnavailableError`` once the store has been
    down for ``retry_seconds``, and whatever ``encode`` raises, having removed what it wrote."""
    records: list[ImageRecord] = []
    written: list[str] = []
    try:
        for index, (image, seed) in enumerate(images):
            encoded = encode(image, seed)
            key = objects.image(record.id, token, index, encoded.extension)
            with_retries(partial(store.put, key, encoded.data, encoded.content_type, ttl), retry_seconds, key)
            written.append(key)
            journey_key = None
            if index < len(journeys):
                journey_key = objects.journey(record.id, token, index)
                animation = encode_journey_frames(journeys[index])
                with_retries(partial(store.put, journey_key, animation, "image/webp", ttl), retry_seconds, journey_key)
                written.append(journey_key)
            records.append(
                ImageRecord(
                    index=index,
                    seed=seed,
                    width=image.width,
                    height=image.height,
                    sha256=hashlib.sha256(encoded.data).hexdigest(),
                    size_bytes=len(encoded.data),
                    key=key,
                    content_type=encoded.content_type,
                    extension=encoded.extension,
                    journey_key=journey_key,
                )
            )
    except BaseException:
        discard(store, written)
        raise
    return StoredRun(records, written)


def discard(store: ResultStore, keys: list[str]) -> None:
    """Best-effort removal of a run's objects that no record will refer to (the sweeper catches the rest)."""
    if not keys:
        return
    try:
        store.delete(keys)
    except Exception as error:  # the store being down is why we are here, often
        log.info("could not remove %d unreferenced object(s) now (%s); the store sweep will", len(keys), error)


def read_input(store: ResultStore, key: str, retry_seconds: float) -> bytes | None:
    """An editing job's stored input, retried while the store is unreachable."""
    found: list[bytes | None] = []
    with_retries(lambda: found.append(store.get(key)), retry_seconds, key)
    return found[-1]
