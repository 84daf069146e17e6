"""The records diffq keeps in Redis, as pydantic models shared by API and worker.

A ``JobRecord`` is stored as a Redis hash with one JSON-encoded value per
field, so either side can update a few fields atomically (see ``store``)
and later features can add fields without reshaping existing records.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Re-exported here, where records were always imported from; the request rules define them.
from diffq.app.contract.rules import JobMode, Outpaint
from diffq.app.contract.status import JobStatus


def utcnow() -> datetime:
    """Timestamps are always timezone-aware UTC, so API and worker hosts agree."""
    return datetime.now(UTC)


class ErrorCode(str, Enum):
    """Machine-readable reasons a job failed; clients branch on these, humans read the message."""

    INVALID_REQUEST = "invalid_request"  # the engine refused a parameter at run time (the API missed it)
    GENERATION_ERROR = "generation_error"  # the model raised while generating (a diffusers ValueError too)
    TIMEOUT = "timeout"  # ran longer than the deployment's job_timeout
    WORKER_LOST = "worker_lost"  # the worker died or RQ gave up on the job
    REFUSED = "refused"  # the queued RQ job was not diffq's task
    DEADLINE_EXCEEDED = "deadline_exceeded"  # still queued when the request's deadline passed
    OUT_OF_MEMORY = "out_of_memory"  # did not fit in the worker's device memory, even run alone
    STORAGE_UNAVAILABLE = "storage_unavailable"  # the result store stayed unreachable past store_retry
    INTERNAL_ERROR = "internal_error"  # a bug in diffq; the message says what
    SIGNING_FAILED = "signing_failed"  # content credentials were required and could not be signed


class ErrorInfo(BaseModel):
    """Why a job failed: a stable code and a message for people."""

    code: str
    message: str


class InputImage(BaseModel):
    """An input image of an editing job, as stored (normalised PNG) under ``keys.job_input``."""

    model_config = ConfigDict(frozen=True)

    source: str = Field(description='"upload", "alpha" (mask made from the image\'s alpha) or "job:<id>/<n>".')
    width: int
    height: int
    sha256: str = Field(description="sha256 of the stored PNG the worker reads.")
    key: str | None = Field(None, description="Its result store object key (None: an older job's Redis key).")


WEBHOOK_EVENTS = ("queued", "running", "succeeded", "failed", "canceled")
"""Job events a webhook can subscribe to (status changes; not progress or previews)."""

WebhookEvent = Literal["queued", "running", "succeeded", "failed", "canceled"]


class Webhook(BaseModel):
    """Where to POST a job's status changes, and which ones (signed, retried: ``diffq.app.webhooks``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(
        min_length=1,
        max_length=2048,
        description="http(s) URL that receives the events; it must resolve to public addresses unless the "
        "deployment allows loopback or private ones. Redirects are not followed.",
    )
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list[WebhookEvent](["succeeded", "failed", "canceled"]),
        min_length=1,
        description="Events to send: any of queued, running, succeeded, failed, canceled (default: the three "
        "terminal ones).",
    )

    @field_validator("events")
    @classmethod
    def _unique(cls, events: list[str]) -> list[str]:
        return list(dict.fromkeys(events))


class LoraParam(BaseModel):
    """A LoRA adapter applied to a job: which file exactly (its sha256) and how strongly."""

    model_config = ConfigDict(frozen=True)

    name: str
    weight: float
    sha256: str


class JobParams(BaseModel):
    """A request with every default resolved, as the worker will run it."""

    model_config = ConfigDict(frozen=True)

    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    seed: int
    num_images: int = 1
    metadata: bool = True  # write generation parameters into the PNGs
    mode: JobMode = JobMode.TXT2IMG
    strength: float | None = None  # editing modes only
    outpaint: Outpaint | None = None  # outpaint only
    image: InputImage | None = None  # editing modes: the (normalised, maybe resized) input
    mask: InputImage | None = None  # inpaint only: white = repaint
    journey: bool = False  # also make an animated image of each picture emerging from noise
    deadline_at: datetime | None = None  # still queued then: the job fails with deadline_exceeded
    webhook: Webhook | None = None  # status events to POST (events.publish schedules them)
    content_credentials: Literal["required", "optional", "off"] = "optional"  # the API key's C2PA policy
    output_format: Literal["png", "webp", "jpeg"] = "png"  # how the images are encoded (worker/encoding.py)
    quality: int | None = None  # webp (None: lossless) and jpeg (None: 90)
    retention_seconds: int | None = None  # the job, its images and keys live this long after it ends (None: job_ttl)
    loras: list[LoraParam] = Field(default_factory=list)  # adapters, in order (from `loras` and <lora:…> tags)


class Progress(BaseModel):
    """Denoising progress of a running job, written by the worker (throttled)."""

    step: int
    total: int
    eta_seconds: float | None = None  # until the run ends, from the measured step times
    step_seconds: float | None = None  # mean time of the steps so far


class PreviewInfo(BaseModel):
    """The latest preview stored for a job."""

    step: int
    total: int
    sha256: str


class ImageRecord(BaseModel):
    """One stored output image; the bytes live in the result store under ``key``."""

    index: int
    seed: int
    width: int
    height: int
    sha256: str  # also the HTTP ETag, so a 304 needs no PNG read
    size_bytes: int
    key: str | None = None  # result store object key (None: an older job's Redis key)
    content_type: str = "image/png"
    extension: str = "png"
    journey_key: str | None = None  # result store object key of its journey, if one was made


class BatchRef(BaseModel):
    """Where a job sits in a batch (``diffq.app.contract.batches``): its terminal event is counted there."""

    id: str
    index: int
    custom_id: str


class JobRecord(BaseModel):
    """Everything diffq knows about one job; the API's job resource is built from it."""

    model_config = ConfigDict(extra="ignore")

    id: str
    status: JobStatus = JobStatus.QUEUED
    model: str
    request: JobParams
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress | None = None
    attempt: int = 0  # runs started so far; the first run is attempt 1
    attempt_token: str | None = None  # identifies the current run; stale runs may not write
    worker: str | None = None  # id of the worker running or last running it
    seeds: list[int] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)  # as resolved by the engine
    error: ErrorInfo | None = None
    images: list[ImageRecord] = Field(default_factory=list)
    cancel_requested: bool = False  # set by POST .../cancel on a running job; the worker stops at the next step
    preview: PreviewInfo | None = None
    journeys: int = 0  # journey animations stored (one per image), when asked for
    lost_attempts: int = 0  # attempts whose worker died (or vanished); max_attempts ends the job
    owner: str | None = None  # id of the API key that made it; None: made while auth was off
    batch: BatchRef | None = None  # the batch it is an item of (POST /v1/batches), if any

    def to_hash(self) -> dict[str, str]:
        """The record as Redis hash fields, each value JSON-encoded."""
        return encode_fields(self.model_dump(mode="json"))

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes] | dict[str, str]) -> JobRecord:
        """Parse ``HGETALL`` output; unknown fields (from newer versions) are ignored."""
        decoded = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in fields.items()}
        return cls.model_validate(decoded)


def encode_fields(values: dict[str, Any]) -> dict[str, str]:
    """JSON-encode hash field values the way ``JobRecord.to_hash`` does."""
    return {name: _encode(value) for name, value in values.items()}


#: ``json.dumps(value, separators=(",", ":"))``, without making an encoder per call.
_encode = json.JSONEncoder(separators=(",", ":")).encode


class ModelRecord(BaseModel):
    """A served model's limits and defaults, as its worker's engine reports them."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    name: str
    pipeline_class: str
    weights_hash: str
    device: str
    dtype: str
    default_width: int
    default_height: int
    min_size: int
    max_size: int
    size_multiple: int
    default_steps: int
    max_steps: int
    default_guidance_scale: float
    default_scheduler: str
    schedulers: list[str]
    max_images: int = 1  # per request
    modes: list[JobMode] = Field(default_factory=lambda: [JobMode.TXT2IMG])  # older workers: text only
    # Steps caps lower than max_steps for some schedulers (an LCM model's "lcm": its distillation's
    # original_inference_steps); older workers: none published, the engine alone refuses those.
    scheduler_max_steps: dict[str, int] = Field(default_factory=dict)
    negative_prompt: bool = True  # whether the pipeline takes a negative prompt (older workers: assumed)
    family: str | None = None  # which LoRA adapters fit it (sd1, sd2, sdxl, or its own); None: older workers


class WorkerRecord(BaseModel):
    """A live worker's registration, renewed by its heartbeat thread."""

    id: str
    model: str
    device: str
    dtype: str
    host: str
    pid: int
    queue: str
    started_at: datetime
    heartbeat_at: datetime
    current_job: str | None = None
    # GPU memory of the worker's device at its latest heartbeat (None: not reported, e.g. a CPU worker);
    # GET /metrics shows them.
    gpu_memory_allocated_bytes: int | None = None
    gpu_memory_reserved_bytes: int | None = None
    gpu_memory_total_bytes: int | None = None
    # A multi-model worker: every model it serves (``model`` is the first), those loaded on its device
    # now, and how long each took to load (seconds, its latest load).
    models: list[str] = Field(default_factory=list)
    loaded: list[str] = Field(default_factory=list)
    load_seconds: dict[str, float] = Field(default_factory=dict)
