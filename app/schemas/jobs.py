"""Job request and job resource schemas.

``JobCreate``'s limits that come from settings (prompt length, steps, images
per job) are applied by ``job_create_model``, which derives a subclass with
those limits in its ``Field``s: one declaration drives both validation and
the OpenAPI schema. Limits that are the same for every model (seed, guidance
scale) are the request rules' (``diffq.app.contract.rules``); those that come from
the model (sizes, steps, schedulers) are only known at run time and are
checked in ``diffq.app.core.validation``.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from diffq.app.contract.records import ErrorInfo, JobMode, JobParams, Outpaint, Progress, Webhook, WebhookEvent
from diffq.app.contract.rules import MAX_GUIDANCE_SCALE, MAX_SEED, MIN_GUIDANCE_SCALE
from diffq.app.contract.status import JobStatus
from diffq.app.settings import Settings


class LoraRequest(BaseModel):
    """A LoRA adapter to apply to this job (see `GET /v1/loras`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="Adapter name, as `GET /v1/loras` lists it.")
    weight: float = Field(1.0, ge=-2.0, le=2.0, description="How strongly it applies: -2 to 2 (1: as trained).")


class JobCreate(BaseModel):
    """A text-to-image or image-editing request. Omitted parameters take the model's defaults.

    As JSON, input images are base64 strings (or data: URLs) or references to
    an earlier job's image; as multipart/form-data, `image` and `mask` may be
    file parts and the other fields form fields (`outpaint` as a JSON object).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    prompt: str = Field(min_length=1, description="What to draw.")
    negative_prompt: str = Field("", description="What to steer away from.")
    model: str | None = Field(
        None, min_length=1, max_length=100, description="Served model name (see `GET /v1/models`)."
    )
    width: int | None = Field(None, ge=1, description="Image width in pixels; the model sets the range and multiple.")
    height: int | None = Field(None, ge=1, description="Image height in pixels; the model sets the range and multiple.")
    steps: int | None = Field(None, ge=1, description="Denoising steps.")
    guidance_scale: float | None = Field(
        None, ge=MIN_GUIDANCE_SCALE, le=MAX_GUIDANCE_SCALE, description="Classifier-free guidance scale."
    )
    scheduler: str | None = Field(None, description="Scheduler name; the model lists the accepted ones.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed of image 0 (image k uses seed + k); random if omitted."
    )
    num_images: int = Field(1, ge=1, description="Images to generate.")
    metadata: bool = Field(True, description="Write the generation parameters into the PNGs' text chunks.")
    mode: JobMode | None = Field(
        None,
        description="txt2img, img2img, inpaint or outpaint. Omitted: txt2img without an image, else inpaint "
        "with a mask, outpaint with `outpaint`, img2img otherwise.",
    )
    image: str | None = Field(
        None,
        description="Input image (PNG, JPEG or WebP): base64 or a data: URL, or `job:<id>/<n>` for image n "
        "of an earlier job. Sets the output size (see `resize`).",
    )
    mask: str | None = Field(
        None,
        description="Inpainting mask, white = repaint, same size as the image: base64, data: URL, "
        '`job:<id>/<n>`, or "alpha" to repaint where the image is transparent (keep a product, '
        "regenerate its background).",
    )
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="How much of the input is re-noised: low stays close to it, 1 ignores it outside the "
        "mask. Default 0.75 for img2img, 1 for inpaint and outpaint.",
    )
    outpaint: Outpaint | None = Field(None, description="Pixels to add on each side; the original pixels are kept.")
    deadline_seconds: float | None = Field(
        None,
        gt=0,
        description="If the job is still queued this many seconds after submission, it ends `failed` with "
        "`deadline_exceeded` instead of running.",
    )
    journey: bool = Field(
        False,
        description="Also make an animated WebP per image of the clean-image estimate over the steps: the "
        "picture emerging from noise (`images[n].journey_url`).",
    )
    resize: bool = Field(
        False,
        description="Scale the image (and mask) to width × height (model default where omitted) instead of "
        "refusing an input whose size does not fit.",
    )
    output_format: Literal["png", "webp", "jpeg"] = Field(
        "png",
        description="png (default), webp (lossless, or lossy with `quality`) or jpeg (`quality`, default 90); "
        "the generation parameters are embedded in each (PNG text chunks; EXIF and XMP in WebP and JPEG).",
    )
    quality: int | None = Field(
        None, ge=1, le=100, description="Lossy quality of webp or jpeg output, 1-100; not accepted for png."
    )
    retention_seconds: int | None = Field(
        None,
        ge=1,
        description="How long the job, its images and all its keys are kept after it ends (default "
        "DIFFQ_JOB_TTL); `expires_at` says when. At most DIFFQ_MAX_RETENTION.",
    )
    loras: list[LoraRequest] = Field(
        default_factory=list,
        max_length=4,
        description='LoRA adapters to apply, e.g. `[{"name": "stripes", "weight": 0.8}]` (`GET /v1/loras` lists '
        "them). A1111's prompt tags `<lora:name:weight>` mean the same and are taken out of the prompt.",
    )
    webhook: Webhook | None = Field(
        None,
        description="POST the job's status changes to this URL, signed per Standard Webhooks and retried with "
        'backoff: `{"url": "https://…", "events": ["succeeded", "failed", "canceled"]}` (in multipart, as a JSON '
        "string).",
    )

    @model_validator(mode="after")
    def _quality_for_lossy(self) -> JobCreate:
        if self.quality is not None and self.output_format == "png":
            raise ValueError("quality: applies only to output_format webp or jpeg (png is lossless)")
        return self

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("must contain something other than whitespace")
        return prompt


@lru_cache(maxsize=8)
def _limited(
    max_prompt_length: int, max_steps: int, max_images: int, max_deadline: int, max_retention: int
) -> type[JobCreate]:
    base = JobCreate.model_fields

    def limited(name: str, **limits: Any) -> Any:
        return (Annotated[base[name].annotation, Field(**limits)], base[name])

    return create_model(
        "JobCreate",
        __base__=JobCreate,
        __module__=__name__,
        prompt=limited("prompt", max_length=max_prompt_length),
        negative_prompt=limited("negative_prompt", max_length=max_prompt_length),
        steps=limited("steps", le=max_steps),
        num_images=limited("num_images", le=max_images),
        deadline_seconds=limited("deadline_seconds", le=max_deadline),
        retention_seconds=limited("retention_seconds", le=max_retention),
    )


def job_create_model(settings: Settings) -> type[JobCreate]:
    """``JobCreate`` with this deployment's limits from settings."""
    return _limited(
        settings.max_prompt_length,
        settings.max_steps,
        settings.max_images_per_job,
        settings.max_deadline,
        settings.max_retention,
    )


class Timings(BaseModel):
    """When the job was created, started running (latest attempt) and ended."""

    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ImagePublic(BaseModel):
    """One finished image."""

    index: int
    url: str
    seed: int
    width: int
    height: int
    journey_url: str | None = Field(None, description="Animated WebP of this image emerging, if `journey` was asked.")
    content_type: str = Field("image/png", description="image/png, image/webp or image/jpeg (`output_format`).")
    url_expires_at: datetime | None = Field(
        None, description="When `url` (and `journey_url`) stop working: signed URLs only (DIFFQ_IMAGE_URLS=signed)."
    )


class WebhookDelivery(BaseModel):
    """One attempt to deliver one event to the job's webhook."""

    delivery_id: str
    event_id: str = Field(description="The `webhook-id` header: the same on every retry of the event.")
    type: str = Field(description="`job.<event>`, e.g. `job.succeeded`.")
    attempt: int = Field(description="1 for the first try of this delivery, then 2, 3, …")
    at: datetime
    status_code: int | None = Field(None, description="The receiver's HTTP status; null if none came back.")
    error: str | None = Field(None, description="Why it failed: HTTP status, refused address, timeout, …")
    duration_ms: float
    outcome: str = Field(description="`delivered`, `retrying` or `gave_up`.")
    next_attempt_at: datetime | None = Field(None, description="When it is tried again, while `retrying`.")


class WebhookPublic(BaseModel):
    """The job's webhook and every delivery attempt so far (oldest first)."""

    url: str
    events: list[WebhookEvent]
    deliveries: list[WebhookDelivery]


class JobPublic(BaseModel):
    """The job resource: everything a client needs, in one GET."""

    model_config = ConfigDict(protected_namespaces=())

    id: str
    status: JobStatus
    model: str
    request: JobParams = Field(description="The request as it runs, defaults resolved.")
    queue_position: int | None = Field(
        None, description="Jobs ahead of this one in its model's queue (0 = next); only while queued."
    )
    eta_seconds: float | None = Field(
        None,
        description="Seconds until the job should end: from the queue ahead and the model's recent job times "
        "while queued, from the measured step times while running.",
    )
    progress: Progress | None = Field(None, description="Denoising step of the running attempt, with its ETA.")
    preview_url: str | None = Field(None, description="Latest intermediate image (PNG), once one exists.")
    cancel_requested: bool = Field(False, description="A cancel was asked while running; it ends within a step.")
    timings: Timings
    attempt: int = Field(description="Runs started so far (0 while never started).")
    seeds: list[int] = Field(description="Seed used for each image.")
    warnings: list[str]
    error: ErrorInfo | None = None
    images: list[ImagePublic]
    expires_at: datetime | None = Field(
        None,
        description="When the job, its images and all its keys are removed (`retention_seconds` after it "
        "ends; while it waits or runs, the time its record would lapse).",
    )
    webhook: WebhookPublic | None = Field(
        None, description="Only with a webhook: its URL and events, and every delivery attempt (oldest first)."
    )


class JobList(BaseModel):
    """The newest jobs, newest first."""

    jobs: list[JobPublic]
