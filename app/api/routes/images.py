"""``/v1/jobs/{id}/images/{n}.{png,webp,jpg}``: finished images (proxied from the result store),
cacheable and revalidated by ETag; the preview and journeys."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Response

from diffq.app.api.errors import ERROR_RESPONSES
from diffq.app.core.errors import ImageNotFoundError
from diffq.app.deps import JobServiceDep, SettingsDep

router = APIRouter(prefix="/v1/jobs", tags=["images"], responses=ERROR_RESPONSES)

IMAGE_RESPONSES: dict[int | str, dict] = {
    200: {"content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}}, "description": "The image."},
    304: {"description": "The client's copy (`If-None-Match`) is current."},
    503: {"description": "The result store is unreachable (`storage_unavailable`); retry after `Retry-After`."},
}


@router.get(
    "/{job_id}/images/{index}.{extension}",
    name="get_image",
    response_class=Response,
    responses=IMAGE_RESPONSES,
    summary="Download one image of a finished job",
)
def get_image(
    job_id: str,
    index: Annotated[int, Path(ge=0, description="Image number, from 0.")],
    extension: Annotated[str, Path(description="The image's format: png, webp or jpg (its `output_format`).")],
    jobs: JobServiceDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    image = jobs.image(job_id, index)
    if extension != image.extension:
        raise ImageNotFoundError(f"image {index} of job {job_id!r} is {image.extension}: {index}.{image.extension}")
    etag = f'"{image.sha256}"'
    # An image never changes once stored, so caches may keep it as long as diffq does.
    headers = {"ETag": etag, "Cache-Control": f"private, max-age={settings.result_ttl}, immutable"}
    if if_none_match is not None and etag_matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    return Response(jobs.image_bytes(job_id, index, image), media_type=image.content_type, headers=headers)


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 weak comparison of an ``If-None-Match`` list (or ``*``) against one ETag."""
    if if_none_match.strip() == "*":
        return True
    candidates = (tag.strip().removeprefix("W/") for tag in if_none_match.split(","))
    return etag.removeprefix("W/") in candidates


@router.get(
    "/{job_id}/preview.png",
    name="get_preview",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The latest preview."}},
    summary="The latest intermediate image of a job",
)
def get_preview(job_id: str, jobs: JobServiceDep) -> Response:
    # Replaced as the run goes on: never cached.
    return Response(jobs.preview(job_id), media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get(
    "/{job_id}/journey/{index}.webp",
    name="get_journey",
    response_class=Response,
    responses={200: {"content": {"image/webp": {}}, "description": "Animated WebP, one frame per step."}},
    summary="Image n emerging from noise: the clean-image estimate at every step",
)
def get_journey(
    job_id: str,
    index: Annotated[int, Path(ge=0, description="Image number, from 0.")],
    jobs: JobServiceDep,
    settings: SettingsDep,
) -> Response:
    headers = {"Cache-Control": f"private, max-age={settings.result_ttl}, immutable"}
    return Response(jobs.journey(job_id, index), media_type="image/webp", headers=headers)
