"""``/v1/jobs``: submit a job, read the job resource, delete a job."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.errors import ERROR_RESPONSES
from app.api.openapi import JOB_CREATE_BODY
from app.core.jobs import JobView
from app.deps import JobServiceDep, SubmissionBody
from app.schemas.jobs import ImagePublic, JobPublic, Timings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    openapi_extra=JOB_CREATE_BODY,
    summary="Submit a text-to-image or image-editing job",
    response_description="The job, queued; `Location` is its URL.",
)
def create_job(body: SubmissionBody, jobs: JobServiceDep, request: Request, response: Response) -> JobPublic:
    # A plain `def`: FastAPI runs it in a worker thread, so decoding input images never
    # blocks the event loop.
    view = jobs.submit(body.body, body.files)
    response.headers["Location"] = str(request.url_for("get_job", job_id=view.record.id))
    return job_public(view, request)


@router.get("/{job_id}", response_model=JobPublic, summary="Read a job")
def get_job(job_id: str, jobs: JobServiceDep, request: Request) -> JobPublic:
    return job_public(jobs.get(job_id), request)


@router.delete("/{job_id}", status_code=204, summary="Delete a job and its images")
def delete_job(job_id: str, jobs: JobServiceDep) -> Response:
    jobs.delete(job_id)
    return Response(status_code=204)


def job_public(view: JobView, request: Request) -> JobPublic:
    """The job resource, with absolute image URLs for this request's host."""
    record = view.record
    images = [
        ImagePublic(
            index=image.index,
            url=str(request.url_for("get_image", job_id=record.id, index=str(image.index))),
            seed=image.seed,
            width=image.width,
            height=image.height,
        )
        for image in record.images
    ]
    return JobPublic(
        id=record.id,
        status=view.status,
        model=record.model,
        request=record.request,
        queue_position=view.queue_position,
        progress=record.progress,
        timings=Timings(created_at=record.created_at, started_at=record.started_at, finished_at=record.finished_at),
        attempt=record.attempt,
        seeds=record.seeds,
        warnings=record.warnings,
        error=view.error,
        images=images,
    )
