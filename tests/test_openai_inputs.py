"""app/core/openai_inputs.py: OpenAI's mask convention and a variation's prompt, in diffq's terms."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffq.app.core.errors import InvalidRequestError
from diffq.app.core.openai_inputs import openai_mask, png_prompt
from diffq.app.core.uploads import UploadLimits

LIMITS = UploadLimits(max_bytes=1 << 20, max_pixels=1 << 16, max_side=256)


def png(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_the_fully_transparent_pixels_of_an_openai_mask_become_diffqs_white_repaint_area() -> None:
    mask = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    mask.paste((0, 0, 0, 0), (2, 2, 6, 6))
    mask.putpixel((0, 0), (0, 0, 0, 1))  # almost transparent is not transparent

    with Image.open(io.BytesIO(openai_mask(png(mask), LIMITS))) as converted:
        assert converted.mode == "L"
        assert converted.getpixel((3, 3)) == 255 and converted.getpixel((7, 7)) == 0
        assert converted.getpixel((0, 0)) == 0
        assert sum(1 for value in converted.getdata() if value == 255) == 16


def test_an_opaque_mask_is_refused_naming_the_mask() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        openai_mask(png(Image.new("RGB", (8, 8), "white")), LIMITS)
    assert refused.value.problems[0].field == "mask" and "transparent" in refused.value.problems[0].message


def test_a_variation_takes_the_prompt_diffq_wrote_into_the_png_and_needs_one() -> None:
    assert png_prompt(png(Image.new("RGB", (8, 8)), {"prompt": "a red circle", "seed": "3"})) == "a red circle"
    for anonymous in (png(Image.new("RGB", (8, 8))), b"not an image"):
        with pytest.raises(InvalidRequestError) as refused:
            png_prompt(anonymous)
        assert refused.value.problems[0].field == "prompt"
