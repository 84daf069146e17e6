"""What a batch hands back: one result line per item, and the archive of its images.

``archive`` writes ``images.zip`` as it is read: the succeeded items' images, named by
custom_id (``<custom_id>.<ext>``, ``<custom_id>-<n>.<ext>`` for jobs of several images), through
the standard library's ``zipfile`` into an unseekable sink that is drained after every entry,
so one image at a time is in memory whatever the archive's size. Stored, not deflated: the
images are compressed already.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from diffq.app.contract.records import ImageRecord, JobRecord, utcnow
from diffq.app.core.errors import ImageNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemView:
    index: int
    custom_id: str
    job_id: str
    record: JobRecord | None  # None: deleted or expired


def item_result(item: ItemView, image_urls: list[str]) -> dict[str, Any]:
    """One line of results.jsonl (and one entry of /items)."""
    record = item.record
    if record is None:
        return {
            "index": item.index,
            "custom_id": item.custom_id,
            "job_id": item.job_id,
            "status": "expired",
            "seeds": [],
            "images": [],
            "error": None,
        }
    return {
        "index": item.index,
        "custom_id": item.custom_id,
        "job_id": item.job_id,
        "status": record.status.value,
        "seeds": record.seeds,
        "images": image_urls,
        "error": record.error.model_dump() if record.error is not None else None,
    }


def archive(items: Iterable[ItemView], read: Callable[[str, int, ImageRecord], bytes]) -> Iterator[bytes]:
    """The zip of ``items``' succeeded images, in chunks; ``read(job id, index, image)`` gives an
    image's bytes. An image gone since (expired, deleted) is left out rather than breaking the stream."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zipped:
        for item in items:
            record = item.record
            if record is None or record.status.value != "succeeded":
                continue
            for image in record.images:
                try:
                    data = read(record.id, image.index, image)
                except ImageNotFoundError:
                    log.warning("image %d of job %s is gone; left out of images.zip", image.index, record.id)
                    continue
                zipped.writestr(_entry(item, record, image), data)
                yield sink.take()
    yield sink.take()


def _entry(item: ItemView, record: JobRecord, image: ImageRecord) -> zipfile.ZipInfo:
    suffix = f"-{image.index}" if len(record.images) > 1 else ""
    when = (record.finished_at or utcnow()).timetuple()[:6]
    return zipfile.ZipInfo(f"{item.custom_id}{suffix}.{image.extension}", date_time=when)


class _Sink(io.RawIOBase):
    """A write-only, unseekable file for ``zipfile``: what it is given is taken out after each entry."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data
