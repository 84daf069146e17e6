"""The one error body every non-2xx response carries."""

from __future__ import annotations

from pydantic import BaseModel, Field


class FieldError(BaseModel):
    """One rejected request field and what would have been accepted."""

    field: str = Field(description="Dotted path of the field, e.g. `width` or `request.steps`.")
    message: str = Field(description="What is wrong and what is accepted.")


class Error(BaseModel):
    """An error: a stable machine-readable code and a message for people."""

    code: str = Field(description="Stable identifier, e.g. `job_not_found`, `invalid_request`.")
    message: str
    fields: list[FieldError] = Field(default_factory=list, description="Per-field problems, for 422s.")
