"""AUTOMATIC1111's error answers for ``/sdapi/v1``: its body, and diffq's domain errors mapped onto it.

A1111 answers ``{"error": <kind>, "detail": <message>, "body": "", "errors": "<status>: <message>"}``;
its clients print ``detail``. Field names in messages are A1111's (``batch_size``, not ``num_images``).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from diffq.app.api.errors import _status_for
from diffq.app.core.errors import DiffqError, FieldProblem, InvalidRequestError, UnknownModelError
from diffq.app.schemas.a1111 import A1111Error

#: diffq field names as A1111 calls them, for naming the field in errors.
A1111_NAMES = {
    "num_images": "batch_size",
    "guidance_scale": "cfg_scale",
    "scheduler": "sampler_name",
    "strength": "denoising_strength",
    "image": "init_images",
}
ERRORS: dict[int | str, dict[str, Any]] = {
    422: {
        "model": A1111Error,
        "description": "A field cannot map onto diffq (`detail` names it and what is accepted).",
    },
    500: {"model": A1111Error, "description": "The job failed (`detail` says why)."},
    503: {"model": A1111Error, "description": "No live worker, or Redis is unreachable: retry."},
    504: {"model": A1111Error, "description": "The job did not end within `DIFFQ_SDAPI_TIMEOUT`; it goes on."},
}


class A1111Failure(Exception):
    """An answer in A1111's error format."""

    def __init__(self, status: int, message: str, error: str = "HTTPException", job_id: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error, self.job_id = status, message, error, job_id

    def response(self) -> JSONResponse:
        headers = {"x-diffq-job-id": self.job_id} if self.job_id else {}
        if self.status == 503:
            headers["Retry-After"] = "1"
        body = {"error": self.error, "detail": self.message, "body": "", "errors": f"{self.status}: {self.message}"}
        return JSONResponse(body, status_code=self.status, headers=headers)


def json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, else a 422."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise A1111Failure(422, "the body must be a JSON object", "RequestValidationError") from None
    if not isinstance(payload, dict):
        raise A1111Failure(422, "the body must be a JSON object", "RequestValidationError")
    return payload


def problem(error: ValidationError) -> FieldProblem:
    """The first problem pydantic found, under A1111's name for the field."""
    first = error.errors(include_url=False)[0]
    name = ".".join(str(part) for part in first["loc"]) or "body"
    return FieldProblem(A1111_NAMES.get(name, name), str(first["msg"]))


def invalid(problems: list[FieldProblem]) -> A1111Failure:
    """A 422 naming every bad field and what is accepted."""
    message = "; ".join(f"{p.field}: {p.message}" for p in problems)
    return A1111Failure(422, message, "RequestValidationError")


def failure(error: DiffqError) -> A1111Failure:
    """A domain error as A1111's answer: no live worker is a 503 (retry), a bad field a 422 under A1111's
    name for it, anything else the status ``diffq.app.api.errors`` gives it."""
    if isinstance(error, UnknownModelError) and any("no live workers" in p.message for p in error.problems):
        return A1111Failure(
            503, "no live worker serves a model right now; start one (diffq worker)", "UnknownModelError"
        )
    if isinstance(error, InvalidRequestError):
        renamed = [FieldProblem(A1111_NAMES.get(p.field, p.field), p.message) for p in error.problems]
        if isinstance(error, UnknownModelError):
            renamed = [FieldProblem("sd_model_checkpoint", p.message) for p in error.problems]
        return invalid(renamed) if renamed else A1111Failure(422, error.message, "RequestValidationError")
    return A1111Failure(_status_for(error), error.message, type(error).__name__)
