"""worker/encoding.py: each output format's bytes, content type, extension and embedded parameters."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageChops

from diffq.worker.encoding import FORMATS, encode_image, read_metadata

PARAMETERS = {"prompt": "a red circle, “naïve” <&> 你好", "seed": "7", "steps": "2", "Software": "diffq test"}


def picture() -> Image.Image:
    return Image.effect_noise((48, 32), 60).convert("RGB")


@pytest.mark.parametrize(("output_format", "quality", "content_type", "extension", "pillow_format"), [
    ("png", None, "image/png", "png", "PNG"),
    ("webp", None, "image/webp", "webp", "WEBP"),
    ("webp", 70, "image/webp", "webp", "WEBP"),
    ("jpeg", None, "image/jpeg", "jpg", "JPEG"),
    ("jpeg", 40, "image/jpeg", "jpg", "JPEG"),
])
def test_each_format_has_its_content_type_extension_and_the_parameters_embedded(
    output_format: str, quality: int | None, content_type: str, extension: str, pillow_format: str
) -> None:
    encoded = encode_image(picture(), output_format, quality, PARAMETERS)
    assert (encoded.content_type, encoded.extension) == (content_type, extension)
    opened = Image.open(io.BytesIO(encoded.data))
    assert opened.format == pillow_format and opened.size == (48, 32)
    assert read_metadata(encoded.data) == PARAMETERS
    if output_format != "png":  # XMP: one diffq:<name> property each, XML-escaped
        assert b'diffq:prompt="a red circle, \xe2\x80\x9cna\xc3\xafve\xe2\x80\x9d &lt;&amp;&gt;' in encoded.data
        assert opened.getexif()[0x0131] == "diffq test"  # EXIF Software


def test_the_same_pixels_and_parameters_give_the_same_bytes() -> None:
    image = picture()
    for output_format in FORMATS:
        assert encode_image(image, output_format, None, PARAMETERS).data == \
            encode_image(image, output_format, None, PARAMETERS).data


def test_webp_without_quality_is_lossless_and_quality_makes_it_lossy() -> None:
    image = picture()
    lossless = Image.open(io.BytesIO(encode_image(image, "webp", None, None).data)).convert("RGB")
    lossy = Image.open(io.BytesIO(encode_image(image, "webp", 30, None).data)).convert("RGB")
    assert ImageChops.difference(image, lossless).getbbox() is None
    assert ImageChops.difference(image, lossy).getbbox() is not None


def test_jpeg_quality_trades_bytes() -> None:
    image = picture()
    assert len(encode_image(image, "jpeg", 20, None).data) < len(encode_image(image, "jpeg", 95, None).data)


def test_without_metadata_nothing_is_embedded() -> None:
    for output_format in FORMATS:
        data = encode_image(picture(), output_format, 80 if output_format != "png" else None, None).data
        assert read_metadata(data) == {} and b"diffq:" not in data


def test_an_unknown_format_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="png, webp, jpeg"):
        encode_image(picture(), "gif", None, None)
