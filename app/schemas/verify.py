"""The answer of ``POST /v1/verify`` (and ``diffq verify --json``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class VerifyReport(BaseModel):
    """What one image carries."""

    name: str
    format: str = Field(description="png, jpeg or webp.")
    width: int
    height: int
    c2pa: dict[str, Any] = Field(
        description="present, valid (intact and signed; a private CA counts as valid), "
        "trusted, state, failures, signer, actions, digital_source_type, generator, "
        "parameters, ingredients."
    )
    iptc: dict[str, Any] = Field(description="digital_source_type (XMP Iptc4xmpExt) and ai_generated.")
    parameters: dict[str, str] | None = Field(description="diffq's generation parameters (PNG text), if kept.")
    watermark: dict[str, Any] = Field(description="checked, and if so found, bit_accuracy and payload.")


class VerifyResponse(BaseModel):
    images: list[VerifyReport]
