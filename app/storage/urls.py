"""The URLs clients fetch images from, by ``DIFFQ_IMAGE_URLS``; the job resource, webhooks and
the OpenAI endpoint all use these.

- ``proxy``: the API's own image routes (the API reads the object and streams it);
- ``signed``: presigned GET URLs straight to the s3 store, minted on each read, valid
  ``signed_url_ttl`` seconds (``expires_at`` says until when);
- ``public``: the object's key under ``public_base_url`` (a CDN in front of the bucket).

Images of jobs stored before the result store (no object key) are always proxied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from diffq.app.contract.records import ImageRecord, JobRecord, utcnow
from diffq.app.settings import Settings
from diffq.app.storage.base import ResultStore

#: Builds the API's own URL of an image (``"image"``) or journey (``"journey"``): kind, job id, index, extension.
ProxyUrl = Callable[[str, str, int, str], str]


@dataclass(frozen=True)
class ImageLinks:
    url: str
    journey_url: str | None
    expires_at: datetime | None  # signed URLs only


def relative_proxy_url(kind: str, job_id: str, index: int, extension: str) -> str:
    """The API's path of an image or journey, for those who know no host (workers, webhooks)."""
    if kind == "journey":
        return f"/v1/jobs/{job_id}/journey/{index}.webp"
    return f"/v1/jobs/{job_id}/images/{index}.{extension}"


def image_links(
    record: JobRecord, image: ImageRecord, settings: Settings, store: ResultStore, proxy: ProxyUrl
) -> ImageLinks:
    """Where a client fetches one image (and its journey) now."""
    if image.key is None or settings.image_urls == "proxy":
        journey = proxy("journey", record.id, image.index, "webp") if image.index < record.journeys else None
        return ImageLinks(proxy("image", record.id, image.index, image.extension), journey, None)
    if settings.image_urls == "signed":
        seconds = settings.signed_url_ttl
        url = store.signed_url(image.key, seconds, image.content_type)
        if url is not None:
            journey = store.signed_url(image.journey_key, seconds, "image/webp") if image.journey_key else None
            return ImageLinks(url, journey, utcnow() + timedelta(seconds=seconds))
    base = (settings.public_base_url or "").rstrip("/")
    journey = f"{base}/{store.public_path(image.journey_key)}" if image.journey_key else None
    return ImageLinks(f"{base}/{store.public_path(image.key)}", journey, None)
