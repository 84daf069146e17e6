"""What an image says about where it came from: C2PA credentials, the IPTC label, diffq's
parameters and the watermark. Used by ``diffq verify`` and ``POST /v1/verify``."""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from diffq.app.provenance import credentials, labels, watermark

MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class NotAnImageError(ValueError):
    """The bytes are not an image this verifier reads (PNG, JPEG or WebP)."""


def verify(
    data: bytes, watermark_payload: bytes | None = None, check_watermark: bool = True, max_pixels: int | None = None
) -> dict[str, Any]:
    """A report on ``data``; ``watermark_payload`` is what the deployment hides (``None``: none);
    an image of more than ``max_pixels`` (read from its header) is refused before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise NotAnImageError(f"{image.width}×{image.height} is more than the {max_pixels} pixels accepted")
            image.load()
            kind = image.format or ""
            xmp = labels.read_xmp(image)
            text = {k: v for k, v in getattr(image, "text", {}).items() if k != labels.PNG_XMP_KEY}
            pixels = image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise NotAnImageError(f"not a PNG, JPEG or WebP image: {error}") from None
    if kind not in MIME:
        raise NotAnImageError(f"a {kind or 'unknown'} image; PNG, JPEG and WebP are read")
    source_type = labels.digital_source_type_of(xmp) if xmp else None
    report: dict[str, Any] = {
        "format": kind.lower(),
        "width": pixels.width,
        "height": pixels.height,
        "c2pa": credentials.read(data, MIME[kind]),
        "iptc": {"digital_source_type": source_type, "ai_generated": source_type in (labels.GENERATED, labels.EDITED)},
        "parameters": text or None,
    }
    if watermark_payload is None:
        report["watermark"] = {"checked": False, "reason": "this deployment sets no DIFFQ_WATERMARK_PAYLOAD"}
    elif not check_watermark:
        report["watermark"] = {
            "checked": False,
            "reason": "the API process does not load the watermark decoder "
            "(it imports torch); run `diffq verify FILE` where the worker extra is installed",
        }
    else:
        report["watermark"] = watermark.read(pixels, watermark_payload)
    return report
