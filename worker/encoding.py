"""Output image encoding: the one place that turns a generated image into stored bytes.

``encode_image(image, format, quality, metadata)`` gives the bytes, their content type and
the file extension for URLs. The generation parameters (``diffq.worker.png.png_text``) are
embedded where each format keeps them: PNG text chunks; in JPEG and WebP an EXIF
``UserComment`` (JSON of all parameters, ``Software``) and an XMP packet with one
``diffq:<name>`` property per parameter, beside the IPTC digital source type (``label``;
``diffq.app.provenance.labels``). The C2PA signature goes on top of these bytes
(``diffq.worker.marking``). Same pixels and parameters give the same bytes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from PIL import Image

from diffq.app import __version__
from diffq.app.provenance import labels
from diffq.worker.png import encode_journey, encode_png

#: format -> (content type, URL extension)
FORMATS = {"png": ("image/png", "png"), "webp": ("image/webp", "webp"), "jpeg": ("image/jpeg", "jpg")}
#: JPEG quality when a request gives none (WebP without quality is lossless).
DEFAULT_JPEG_QUALITY = 90
XMP_NAMESPACE = labels.NAMESPACES["diffq"]
_EXIF_SOFTWARE = 0x0131
_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    content_type: str
    extension: str


def encode_image(
    image: Image.Image,
    output_format: str,
    quality: int | None,
    metadata: dict[str, str] | None,
    label: str | None = None,
) -> EncodedImage:
    """``image`` as ``output_format`` (png, webp, jpeg) with ``metadata`` embedded (None: none)
    and ``label``, an IPTC digital source type, stated in its XMP (None: none)."""
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(FORMATS)}; got {output_format!r}")
    content_type, extension = FORMATS[output_format]
    creator = f"diffq {__version__}"
    if output_format == "png":
        xmp = labels.xmp_packet(label, creator) if label else None
        return EncodedImage(encode_png(image, metadata, xmp), content_type, extension)
    options: dict = {}
    if metadata:
        options["exif"] = _exif(metadata)
    if metadata or label:
        options["xmp"] = labels.xmp_packet(label, creator, metadata).encode("utf-8")
    buffer = io.BytesIO()
    if output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality or DEFAULT_JPEG_QUALITY, **options)
    elif quality is None:
        image.save(buffer, format="WEBP", lossless=True, **options)
    else:
        image.save(buffer, format="WEBP", quality=quality, **options)
    return EncodedImage(buffer.getvalue(), content_type, extension)


def _exif(metadata: dict[str, str]) -> bytes:
    exif = Image.Exif()
    exif[_EXIF_SOFTWARE] = metadata.get("Software", "diffq")
    comment = json.dumps(metadata, sort_keys=True, separators=(",", ":"))  # ensure_ascii: EXIF ASCII comment
    exif.get_ifd(_EXIF_IFD)[_EXIF_USER_COMMENT] = b"ASCII\x00\x00\x00" + comment.encode("ascii")
    return exif.tobytes()


def read_metadata(data: bytes) -> dict[str, str]:
    """The parameters embedded by ``encode_image`` in any of its formats (for tests and tools)."""
    image = Image.open(io.BytesIO(data))
    if image.format == "PNG":
        return dict(image.text)  # type: ignore[attr-defined]
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
    if not comment:
        return {}
    raw = comment if isinstance(comment, bytes) else str(comment).encode()
    return json.loads(raw.removeprefix(b"ASCII\x00\x00\x00").decode("ascii"))


def encode_journey_frames(frames: list[Image.Image]) -> bytes:
    """A journey's animated WebP (``diffq.worker.png.encode_journey``), here beside the images' encoding."""
    return encode_journey(frames)
