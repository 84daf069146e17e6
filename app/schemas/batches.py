"""Batch request and batch resource schemas (``/v1/batches``).

A batch's items are job requests (``JobCreate``, with this deployment's limits) plus the
client's ``custom_id``; ``batch_item_model`` derives that model from the limited
``JobCreate``, so an item is judged by exactly the rules a single job is.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from diffq.app.contract.records import WebhookEvent
from diffq.app.schemas.jobs import JobCreate, job_create_model
from diffq.app.settings import Settings

#: A ``custom_id``: also the file name of the item's images in ``images.zip``, so no path characters.
CUSTOM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CUSTOM_ID_RULE = "1 to 128 of A-Z a-z 0-9 . _ -, not starting with . _ or -"


class BatchWebhook(BaseModel):
    """Where ``batch.completed`` goes (once, signed), and which events of each item also go there."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048, description="HTTPS URL (or one on the deployment's allow list).")
    item_events: list[WebhookEvent] = Field(
        default_factory=list,
        description="Per-item events to send as well (job.succeeded, …): any of queued, running, succeeded, failed, "
        "canceled. Default: none, only batch.completed.",
    )


class BatchCreate(BaseModel):
    """A batch as JSON: ``items`` (job requests), or ``prompt_template`` with ``rows``."""

    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]] | None = Field(
        None, description="Job requests (the fields of POST /v1/jobs) with an optional `custom_id` each."
    )
    prompt_template: str | None = Field(
        None, min_length=1, description="A prompt with `{column}` placeholders, filled from each of `rows`."
    )
    rows: list[dict[str, str | int | float]] | None = Field(
        None, description="With `prompt_template`: one object per item; a `custom_id` key names the item."
    )
    defaults: dict[str, Any] = Field(
        default_factory=dict, description="Job fields every item gets unless it sets them itself (model, steps, …)."
    )
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="Shared input images, base64 or data: URLs, by name; an item's `image` or `mask` "
        "`input:<name>` uses one. Uploaded and decoded once for the whole batch.",
    )
    webhook: BatchWebhook | None = None
    priority: Literal["high", "normal", "low"] = Field(
        "low",
        description="The items' priority class; never above the API key's own. Default low, so the key's "
        "single jobs go first.",
    )
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16, description="Kept and shown back.")


class BatchCounts(BaseModel):
    total: int
    queued: int
    running: int
    succeeded: int
    failed: int
    canceled: int


class BatchPublic(BaseModel):
    """A batch as it is now."""

    id: str
    object: Literal["batch"] = "batch"
    status: Literal["in_progress", "completed", "canceling", "canceled"]
    model: str
    priority: str
    counts: BatchCounts
    progress: float = Field(description="Ended items / total, 0 to 1.")
    eta_seconds: float | None = Field(None, description="Until the last item ends, from the model's recent job times.")
    created_at: float
    completed_at: float | None = None
    expires_at: float | None = Field(None, description="When the batch and its items are removed (unix seconds).")
    metadata: dict[str, str] = Field(default_factory=dict)
    url: str
    items_url: str
    results_url: str
    images_url: str


class BatchItemPublic(BaseModel):
    """One item: its job and how it ended (the same fields as a line of results.jsonl)."""

    index: int
    custom_id: str
    job_id: str
    status: str
    seeds: list[int] = Field(default_factory=list)
    images: list[str] = Field(default_factory=list, description="URLs of its images.")
    error: dict[str, str] | None = None


class BatchItems(BaseModel):
    items: list[BatchItemPublic]
    next_offset: int | None = Field(None, description="Pass as `offset` for the next page; null: none left.")


class BatchList(BaseModel):
    batches: list[BatchPublic]


def batch_item_model(settings: Settings) -> type[JobCreate]:
    """``JobCreate`` with this deployment's limits, plus ``custom_id``."""
    return _item_model(job_create_model(settings))


@lru_cache(maxsize=8)
def _item_model(base: type[JobCreate]) -> type[JobCreate]:
    return create_model(
        "BatchItem",
        __base__=base,
        __module__=__name__,
        custom_id=(
            str | None,
            Field(None, pattern=CUSTOM_ID_PATTERN, description=f"The item's name: {CUSTOM_ID_RULE}."),
        ),
    )
