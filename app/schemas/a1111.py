"""AUTOMATIC1111's response bodies on ``/sdapi/v1``, as its clients read them (for the OpenAPI document)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class A1111Error(BaseModel):
    """A1111's error body."""

    error: str = Field(description="The kind of error, e.g. RequestValidationError, TimeoutError.")
    detail: str = Field(description="What went wrong; for a refused field, its name and what is accepted.")
    body: str = ""
    errors: str = Field(description='"<status>: <detail>".')


class GenerationAnswer(BaseModel):
    """``txt2img`` / ``img2img``: A1111's ``TextToImageResponse`` / ``ImageToImageResponse``."""

    images: list[str] = Field(description="Base64 PNGs; none for an interrupted job or `send_images: false`.")
    parameters: dict[str, Any] = Field(description="The request as run, the model's defaults filled in.")
    info: str = Field(description="JSON: seed, all_seeds, infotexts, sd_model_name, diffq_job_id …")


class ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str
    job_count: int = Field(description="The key's queued and running /sdapi/v1 jobs.")
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressAnswer(BaseModel):
    """``progress``: the API key's running /sdapi/v1 job."""

    progress: float = Field(description="0-1: steps done of the running job.")
    eta_relative: float = Field(description="Seconds until it ends (0 when unknown).")
    state: ProgressState
    current_image: str | None = Field(description="Base64 PNG preview of the running job.")
    textinfo: str | None
    current_task: str | None


class SdModel(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class ScheduleItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float


class ScriptsList(BaseModel):
    txt2img: list[str]
    img2img: list[str]
