"""What ``GET /v1/models`` returns about each model that live workers serve."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from diffq.app.contract.records import JobMode


class WorkerPublic(BaseModel):
    """A live worker serving a model."""

    id: str
    device: str
    dtype: str
    host: str
    heartbeat_at: datetime
    busy: bool
    loaded: bool = Field(description="The model sits loaded on this worker's device now (else a job loads it first).")
    load_seconds: float | None = Field(None, description="How long this worker's latest load of the model took.")


class ModelPublic(BaseModel):
    """A served model with the limits and defaults requests are checked against."""

    model_config = ConfigDict(protected_namespaces=())

    name: str
    pipeline_class: str
    weights_hash: str
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
    max_images: int
    modes: list[JobMode] = Field(description="Job modes the model serves: txt2img, img2img, inpaint, outpaint.")
    family: str | None = Field(None, description="Which LoRA adapters fit it (`GET /v1/loras`' `base_model`).")
    scheduler_max_steps: dict[str, int] = Field(
        default_factory=dict,
        description="Schedulers that take fewer steps than `max_steps`, and their cap (an LCM model's `lcm`: the "
        "steps it was distilled on).",
    )
    negative_prompt: bool = Field(True, description="Whether the model takes a negative prompt.")
    workers: list[WorkerPublic] = Field(description="Live workers that serve the model: loaded, or able to load it.")
    loaded_on: list[str] = Field(description="Ids of the workers that have it loaded now.")
    load_seconds: float | None = Field(
        None, description="The longest latest load time among its workers (what a job may wait if none has it loaded)."
    )


class ModelList(BaseModel):
    """The served models, by name."""

    models: list[ModelPublic]
