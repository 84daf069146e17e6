"""OpenAI's image-editing inputs in diffq's terms: its mask convention, and a variation's prompt.

OpenAI's mask is a PNG the image's size whose fully transparent pixels (alpha 0) are the ones to
edit; diffq's is greyscale, white = repaint. A variation has no prompt in OpenAI's API, and diffq's
image-to-image needs one: it is the prompt diffq wrote into the PNG when it made the image.
"""

from __future__ import annotations

import io

from PIL import Image

from diffq.app.core.errors import FieldProblem, InvalidRequestError
from diffq.app.core.uploads import UploadLimits, decode_image


def openai_mask(data: bytes, limits: UploadLimits) -> bytes:
    """OpenAI's mask as diffq's: a greyscale PNG, white where the mask is fully transparent."""
    mask = decode_image(data, "mask", limits)
    if not mask.has_alpha:
        raise InvalidRequestError(
            [
                FieldProblem(
                    "mask",
                    "has no transparent pixels; the mask is a PNG the image's "
                    "size whose fully transparent pixels mark where to edit",
                )
            ]
        )
    with Image.open(io.BytesIO(mask.png)) as image:
        alpha = image.getchannel("A")
    repaint = alpha.point(lambda value: 255 if value == 0 else 0)
    buffer = io.BytesIO()
    repaint.save(buffer, format="PNG")
    return buffer.getvalue()


def png_prompt(data: bytes) -> str:
    """The prompt diffq wrote into a PNG it made (``diffq.worker.png``'s ``prompt`` text chunk)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            prompt = image.info.get("prompt") if image.format == "PNG" else None
    except OSError:
        prompt = None
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError(
            [
                FieldProblem(
                    "prompt",
                    "is required: diffq makes variations by image-to-image, "
                    "which needs a prompt; send `prompt` as an extra field, or an image "
                    "diffq made (its PNG carries its prompt)",
                )
            ]
        )
    return prompt
