"""``POST /v1/verify``: what uploaded images carry of C2PA credentials, the IPTC label, diffq's
parameters and the watermark (the same report as ``diffq verify FILE``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from diffq.app.core.errors import FieldProblem, InvalidRequestError, UploadTooLargeError
from diffq.app.deps import CallerDep
from diffq.app.provenance.verify import NotAnImageError, verify
from diffq.app.schemas.verify import VerifyReport, VerifyResponse

router = APIRouter(tags=["provenance"])

MAX_FILES = 16


@router.post(
    "/v1/verify",
    response_model=VerifyResponse,
    summary="Check images for content credentials, the AI label, parameters and the watermark",
    responses={413: {"description": "A file is larger than DIFFQ_MAX_UPLOAD_BYTES."}},
)
async def verify_images(
    request: Request,
    caller: CallerDep,
    file: Annotated[list[UploadFile], File(description="One or more PNG, JPEG or WebP images (repeat the field).")],
) -> VerifyResponse:
    settings = request.app.state.settings
    if len(file) > MAX_FILES:
        raise InvalidRequestError([FieldProblem("file", f"{len(file)} files; at most {MAX_FILES} per request")])
    payload = settings.watermark_payload.encode() if settings.watermark_payload else None
    reports: list[VerifyReport] = []
    for index, upload in enumerate(file):
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise UploadTooLargeError(f"file[{index}]", upload.size or len(data), settings.max_upload_bytes)
        client = request.client.host if request.client is not None else "unknown"
        gate = request.app.state.decode_gate.slot(caller.key.id if caller.key is not None else f"address:{client}")
        try:
            async with gate:  # decodes share the per-key bound of uploads (diffq.app.api.decode_gate)
                report: dict[str, Any] = await run_in_threadpool(
                    verify, data, payload, check_watermark=False, max_pixels=settings.max_upload_pixels
                )
        except NotAnImageError as error:
            raise InvalidRequestError([FieldProblem(f"file[{index}]", str(error))]) from None
        reports.append(VerifyReport(name=upload.filename or f"file[{index}]", **report))
    return VerifyResponse(images=reports)
