"""What ``GET /v1/loras`` returns about each LoRA adapter on offer."""

from __future__ import annotations

from pydantic import BaseModel, Field


class LoraPublic(BaseModel):
    """One adapter file of the deployment's adapter folder."""

    name: str = Field(description="What `loras[].name` and `<lora:name:weight>` refer to.")
    base_model: str | None = Field(
        description="Model family it was trained for (a served model's `family`); null: not recorded, offered for all."
    )
    sha256: str = Field(description="sha256 of the file: job records and image metadata name it.")
    size_bytes: int


class LoraList(BaseModel):
    """The adapters, by name."""

    loras: list[LoraPublic]
