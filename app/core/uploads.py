"""Safe decoding of user-uploaded images (img2img, inpainting and outpainting inputs).

An upload is hostile until proven otherwise. ``decode_image`` checks it in
order of cost, so that nothing expensive happens to data that a cheap check
can refuse:

1. the encoded size, against ``UploadLimits.max_bytes`` (413);
2. the magic bytes: only PNG, JPEG and WebP, named from the bytes, never
   from a client's file name or media type;
3. a walk of the container (PNG chunks, JPEG markers, WebP RIFF chunks):
   complete, undamaged, nothing appended, no more chunks, segments or scans
   than real files have, and the size the header declares;
4. that declared size, against ``max_side`` and ``max_pixels``, before Pillow
   allocates or decodes a single pixel;
5. Pillow opens the file (only as the sniffed format) and must agree on the
   format and size; animations are refused;
6. the full decode, EXIF orientation, and
   a conversion to RGB or RGBA;
7. a fresh PNG with no metadata: what the workers get, whatever came in.

Every refusal is an ``InvalidRequestError`` naming the field and what would be
accepted, or ``UploadTooLargeError`` for the size cap; nothing else escapes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from diffq.app.core.errors import FieldProblem, InvalidRequestError, UploadTooLargeError

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")

_ACCEPTED = "accepted: PNG, JPEG, WebP"
_COMPLETE = "accepted: a complete, undamaged PNG, JPEG or WebP file"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"


@dataclass(frozen=True)
class UploadLimits:
    """What one uploaded image may be; the API builds it from its settings."""

    max_bytes: int  # encoded file size cap
    max_pixels: int  # width*height cap, checked from the header before any pixel decoding
    max_side: int  # cap on width and on height
    hint: str = ""  # what to do about a refused size (e.g. send resize: true), appended to its message


@dataclass(frozen=True)
class DecodedImage:
    """An upload that passed every check, re-encoded as a plain PNG."""

    png: bytes  # mode RGB, or RGBA only when some pixel is not fully opaque; no metadata chunks
    width: int  # after EXIF orientation
    height: int
    has_alpha: bool  # png is RGBA
    source_format: str  # "PNG" | "JPEG" | "WEBP"
    sha256: str  # hex sha256 of png


class _Refused(Exception):
    """Why the upload is refused; ``decode_image`` attaches the field name."""


def decode_image(data: bytes, field: str, limits: UploadLimits) -> DecodedImage:
    """Check and decode one uploaded image; see the module docstring for the order of checks."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidRequestError([FieldProblem(field, f"must be image bytes, not {type(data).__name__}")])
    data = bytes(data)
    if len(data) > limits.max_bytes:
        raise UploadTooLargeError(field, len(data), limits.max_bytes)
    try:
        return _decode(data, limits)
    except _Refused as refused:
        raise InvalidRequestError([FieldProblem(field, str(refused))]) from None


def check_header(data: bytes, field: str, limits: UploadLimits) -> tuple[int, int]:
    """Steps 1 to 4 alone (no pixel is decoded): the size the header declares, or a refusal.
    Lets a request check all its inputs cheaply before decoding any of them."""
    if len(data) > limits.max_bytes:
        raise UploadTooLargeError(field, len(data), limits.max_bytes)
    try:
        _fmt, width, height, _images = _header(data, limits)
    except _Refused as refused:
        raise InvalidRequestError([FieldProblem(field, str(refused))]) from None
    return width, height


def _header(data: bytes, limits: UploadLimits) -> tuple[str, int, int, int]:
    if not data:
        raise _Refused(f"is empty; {_ACCEPTED}")
    fmt = _sniff(data)
    width, height, images = _HEADER_WALKS[fmt](data)
    _check_size(width, height, limits)
    return fmt, width, height, images


def _decode(data: bytes, limits: UploadLimits) -> DecodedImage:
    fmt, width, height, images = _header(data, limits)
    image = _pillow_decode(data, fmt, (width, height), images)
    try:
        png = _encode_png(image)
    except Exception as exc:  # MemoryError above all: the size checks bound it, but not to zero
        raise _Refused(f"could not be re-encoded ({_describe(exc)}); {_COMPLETE}") from None
    return DecodedImage(
        png=png,
        width=image.width,
        height=image.height,
        has_alpha=image.mode == "RGBA",
        source_format=fmt,
        sha256=hashlib.sha256(png).hexdigest(),
    )


# --- magic bytes ------------------------------------------------------------------------------------------------

# Formats that are refused, named so the client learns what it sent. Checked only after the accepted ones.
_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"%PDF-", "PDF"),
    (b"%!PS", "PostScript"),
    (b"PK\x03\x04", "ZIP"),
    (b"PK\x05\x06", "ZIP"),
    (b"\x1f\x8b", "gzip"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!", "RAR"),
    (b"8BPS", "PSD"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "HDR"),
    (b"qoif", "QOI"),
    (b"\x7fELF", "ELF executable"),
    (b"MZ", "Windows executable"),
)
_FTYP_BRANDS = {
    b"avif": "AVIF",
    b"avis": "AVIF",
    b"heic": "HEIC",
    b"heix": "HEIC",
    b"heim": "HEIC",
    b"heis": "HEIC",
    b"hevc": "HEIC",
    b"hevx": "HEIC",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
    b"crx ": "Canon CR3",
    b"qt  ": "QuickTime",
    b"isom": "MP4",
    b"mp41": "MP4",
    b"mp42": "MP4",
}
_TEXT_MARKUP = (
    (re.compile(rb"<svg[\s>]", re.I), "SVG"),
    (re.compile(rb"<!doctype\s+svg", re.I), "SVG"),
    (re.compile(rb"<!doctype\s+html|<html[\s>]|<head[\s>]|<body[\s>]|<script[\s>]", re.I), "HTML"),
    (re.compile(rb"<\?xml\s", re.I), "XML"),
)


def _sniff(data: bytes) -> str:
    """The accepted format the magic bytes announce, or a refusal naming what they do announce."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(_JPEG_SOI):
        return "JPEG"
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in ((PNG_SIGNATURE, "PNG"), (_JPEG_SOI, "JPEG"), (b"RIFF", "WebP")):
        if signature.startswith(data):
            count = f"{len(data)} byte" + ("s" if len(data) > 1 else "")
            raise _Refused(f"ends after {count}, inside the {name} signature (truncated); {_COMPLETE}")
    other = _other_format(data)
    if other is not None:
        raise _Refused(f"format {other} is not accepted; {_ACCEPTED}")
    raise _Refused(f"is not a PNG, JPEG or WebP image (its first bytes match no known image format); {_ACCEPTED}")


def _other_format(data: bytes) -> str | None:
    for signature, name in _OTHER_MAGIC:
        if data.startswith(signature):
            return name
    if data[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(data[8:12], "ISO media (ftyp)")
    if data.startswith(b"RIFF") and len(data) >= 12:
        return {b"WAVE": "WAV", b"AVI ": "AVI"}.get(data[8:12], "RIFF (not WebP)")
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")  # markup may open with a BOM or blank lines
    for pattern, name in _TEXT_MARKUP:
        if pattern.search(head[:512]) and head.startswith(b"<"):
            return name
    return None


# --- container walks --------------------------------------------------------------------------------------------
#
# Pillow reads a file only as far as it needs and ignores what follows, so it cannot say whether anything was
# appended (a ZIP or an HTML page riding behind the image: a polyglot), and it skips the CRC of IDAT chunks.
# Only a walk of the container from its first byte to its last can, so these few lines parse bytes by hand.
# The walk also yields the size the header declares: Pillow's ``Image.open`` runs its own decompression-bomb
# check before it returns the size, and ours must come first and name our own limits.

_Header = tuple[int, int, int]  # declared width, declared height, count of complete images in the file

# Caps on structure that no real file comes near. Pillow walks chunks and segments in Python (between JPEG
# segments, byte by byte), so a 10 MB file of empty chunks, segments or fill bytes would hold a CPU for seconds.
_MAX_PNG_CHUNKS = 65_536  # room for one IDAT chunk per row of the tallest image, and its metadata
_MAX_JPEG_SEGMENTS = 4_096  # per file; a camera JPEG has a few dozen (an ICC profile or MPO adds a few more)
_MAX_JPEG_SCANS = 100  # per image; progressive files have about 10, and libjpeg passes over the image per scan
_MAX_JPEG_FILL = 1_024  # 0xFF fill bytes before markers, per file; encoders write none or a few
_MAX_WEBP_CHUNKS = 1_024


def _png_header(data: bytes) -> _Header:
    view = memoryview(data)
    pos = len(PNG_SIGNATURE)
    size: tuple[int, int] | None = None
    has_idat = False
    for _ in range(_MAX_PNG_CHUNKS):
        if pos + 12 > len(data):
            raise _Refused(f"PNG data ends at byte {len(data)}, inside a chunk header (truncated); {_COMPLETE}")
        length, kind = struct.unpack_from(">I4s", data, pos)
        name = kind.decode("latin-1")
        end = pos + 12 + length
        if not kind.isalpha():
            raise _Refused(f"PNG data has no valid chunk at byte {pos} (damaged); {_COMPLETE}")
        if length > 0x7FFFFFFF or end > len(data):
            raise _Refused(
                f"PNG chunk {name} at byte {pos} claims {length} bytes, past the end of the data (truncated or "
                f"damaged); {_COMPLETE}"
            )
        if zlib.crc32(view[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            raise _Refused(f"PNG chunk {name} at byte {pos} fails its CRC check (damaged); {_COMPLETE}")
        if size is None:
            if kind != b"IHDR" or length != 13:
                raise _Refused(f"PNG data does not start with an IHDR chunk (damaged); {_COMPLETE}")
            size = struct.unpack_from(">II", data, pos + 8)
        has_idat = has_idat or kind == b"IDAT"
        if kind == b"IEND":
            break
        pos = end
    else:
        raise _Refused(f"PNG data has more than {_MAX_PNG_CHUNKS} chunks; {_COMPLETE} of at most that many")
    if not has_idat:
        raise _Refused(f"PNG data has no IDAT chunk, so no pixels; {_COMPLETE}")
    _nothing_after(data, end, "PNG")
    return size[0], size[1], 1


# Start-of-frame markers carry the image size: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_FILL = re.compile(rb"\xff+")
# Inside entropy-coded data 0xFF is followed by 0x00 (a stuffed 0xFF byte) or by RST0..RST7; any other byte after
# a run of 0xFF (fill bytes) is the marker that ends the scan. A regex finds it at C speed: a scan made of nothing
# but FF 00 pairs would otherwise cost a Python loop turn per two bytes.
_JPEG_SCAN_END = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")


def _jpeg_header(data: bytes) -> _Header:
    """Walk every JPEG image in the file; an MPO (multi-picture) file is several, back to back."""
    walk = _JpegWalk(data)
    size = walk.image()
    images = 1
    while walk.pos < len(data) and data.startswith(_JPEG_SOI, walk.pos):
        walk.image()
        images += 1
    _nothing_after(data, walk.pos, "JPEG")
    return size[0], size[1], images


class _JpegWalk:
    """Marker by marker through a JPEG file, counting what the caps above bound."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.segments = 0
        self.fill = 0

    def image(self) -> tuple[int, int]:
        """From the SOI at ``pos`` to just past its EOI; returns the declared width and height."""
        data = self.data
        self.pos += 2
        size: tuple[int, int] | None = None
        scans = 0
        while True:
            marker = self._marker()
            if marker == 0xD9:  # EOI
                if size is None or not scans:
                    raise _Refused(f"JPEG data ends before any image data (no scan); {_COMPLETE}")
                return size
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM and RSTn stand alone, without a length
                continue
            start = self.pos - 2
            if marker in (0x00, 0xD8):
                raise _Refused(f"JPEG data has a stray marker FF{marker:02X} at byte {start} (damaged); {_COMPLETE}")
            if self.pos + 2 > len(data):
                raise _Refused(f"JPEG data ends at byte {len(data)}, inside a segment header (truncated); {_COMPLETE}")
            (length,) = struct.unpack_from(">H", data, self.pos)
            if length < 2 or self.pos + length > len(data):
                raise _Refused(
                    f"JPEG segment FF{marker:02X} at byte {start} claims {length} bytes, past the end of the data "
                    f"(truncated or damaged); {_COMPLETE}"
                )
            if marker in _JPEG_SOF and size is None:
                if length < 8:
                    raise _Refused(f"JPEG frame header at byte {start} is too short (damaged); {_COMPLETE}")
                height, width = struct.unpack_from(">HH", data, self.pos + 3)
                size = (width, height)
            self.pos += length
            if marker == 0xDA:  # SOS: entropy-coded data follows, up to the next real marker
                if size is None:
                    raise _Refused(f"JPEG data has a scan before its frame header (damaged); {_COMPLETE}")
                scans += 1
                if scans > _MAX_JPEG_SCANS:
                    raise _Refused(
                        f"JPEG image has more than {_MAX_JPEG_SCANS} scans; {_COMPLETE} of at most that many"
                    )
                match = _JPEG_SCAN_END.search(data, self.pos)
                if match is None:
                    raise _Refused(f"JPEG data ends inside its compressed image data (truncated); {_COMPLETE}")
                self.pos = match.start()

    def _marker(self) -> int:
        """The marker code at ``pos`` (after any fill bytes); leaves ``pos`` just past it."""
        fill = _JPEG_FILL.match(self.data, self.pos)
        if fill is None:
            where = "ends" if self.pos >= len(self.data) else "has no marker"
            raise _Refused(f"JPEG data {where} at byte {self.pos} (truncated or damaged); {_COMPLETE}")
        if fill.end() >= len(self.data):
            raise _Refused(f"JPEG data ends at byte {len(self.data)}, inside a marker (truncated); {_COMPLETE}")
        self.fill += fill.end() - fill.start() - 1
        self.segments += 1
        if self.fill > _MAX_JPEG_FILL:
            raise _Refused(f"JPEG data has more than {_MAX_JPEG_FILL} 0xFF fill bytes between segments; {_COMPLETE}")
        if self.segments > _MAX_JPEG_SEGMENTS:
            raise _Refused(f"JPEG data has more than {_MAX_JPEG_SEGMENTS} markers; {_COMPLETE} of at most that many")
        self.pos = fill.end() + 1
        return self.data[fill.end()]


def _webp_header(data: bytes) -> _Header:
    (riff_size,) = struct.unpack_from("<I", data, 4)
    end = 8 + riff_size
    if riff_size < 4 + 8 + 10:  # "WEBP", one chunk header, the smallest image header
        raise _Refused(f"WebP data declares a RIFF size of {riff_size} bytes, too small for an image; {_COMPLETE}")
    if end > len(data):
        raise _Refused(f"WebP data is {len(data)} bytes but its RIFF header declares {end} (truncated); {_COMPLETE}")
    if len(data) == end + 1 and riff_size % 2 == 1:  # the pad byte of an odd-sized last chunk, left uncounted
        end += 1
    _nothing_after(data, end, "WebP")

    # Every chunk must fit in the container; the first one (VP8X, VP8 or VP8L) carries the canvas size.
    container_end, pos, chunks = 8 + riff_size, 12, 0
    while pos < container_end:
        chunks += 1
        if chunks > _MAX_WEBP_CHUNKS:
            raise _Refused(f"WebP data has more than {_MAX_WEBP_CHUNKS} chunks; {_COMPLETE} of at most that many")
        if pos + 8 > container_end:
            raise _Refused(f"WebP data ends at byte {pos}, inside a chunk header (damaged); {_COMPLETE}")
        kind, length = struct.unpack_from("<4sI", data, pos)
        if pos + 8 + length > container_end:
            raise _Refused(
                f"WebP chunk {kind.decode('latin-1')!r} at byte {pos} claims {length} bytes, past the end of its "
                f"RIFF container (truncated or damaged); {_COMPLETE}"
            )
        pos += 8 + length + (length & 1)
    (first_length,) = struct.unpack_from("<I", data, 16)
    width, height = _webp_size(data[12:16], data[20 : 20 + min(first_length, 10)])
    return width, height, 1


def _webp_size(kind: bytes, payload: bytes) -> tuple[int, int]:
    """Canvas size from the first chunk, which the WebP container spec requires to be VP8X, VP8 or VP8L."""
    if kind == b"VP8X" and len(payload) >= 10:
        return 1 + int.from_bytes(payload[4:7], "little"), 1 + int.from_bytes(payload[7:10], "little")
    if kind == b"VP8L" and len(payload) >= 5 and payload[0] == 0x2F:
        bits = int.from_bytes(payload[1:5], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if kind == b"VP8 " and len(payload) >= 10 and payload[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", payload, 6)
        return width & 0x3FFF, height & 0x3FFF  # the top two bits are an upscaling hint, not size
    raise _Refused(f"WebP data does not start with a valid VP8, VP8L or VP8X header (damaged); {_COMPLETE}")


def _nothing_after(data: bytes, end: int, name: str) -> None:
    if end != len(data):
        extra = len(data) - end
        raise _Refused(
            f"has {extra} bytes after the end of the {name} image (appended data is not accepted); "
            f"accepted: a PNG, JPEG or WebP file with nothing appended"
        )


_HEADER_WALKS: dict[str, Callable[[bytes], _Header]] = {
    "PNG": _png_header,
    "JPEG": _jpeg_header,
    "WEBP": _webp_header,
}


def _check_size(width: int, height: int, limits: UploadLimits) -> None:
    if width <= 0 or height <= 0:
        raise _Refused(f"declares a size of {width}×{height}; accepted: at least 1 pixel wide and high")
    hint = f"; {limits.hint}" if limits.hint else ""
    if width > limits.max_side or height > limits.max_side:
        raise _Refused(f"is {width}×{height}; each side at most {limits.max_side} pixels accepted{hint}")
    if width * height > limits.max_pixels:
        raise _Refused(f"is {width}×{height} = {width * height} pixels; at most {limits.max_pixels} accepted{hint}")
    bomb = Image.MAX_IMAGE_PIXELS
    if bomb is not None and width * height > bomb:  # Pillow's own guard, applied here, before Pillow opens it
        raise _Refused(f"is {width}×{height} = {width * height} pixels; at most {bomb} accepted")


# --- Pillow -----------------------------------------------------------------------------------------------------

# No lock and no ``warnings.catch_warnings`` here: decodes run in parallel in the API's thread pool (bounded per
# key and per process by ``diffq.app.api.decode_gate``). Pillow's decompression-bomb guard is applied by ``_check_size``
# from the header, before Pillow sees the file, so it needs no process-wide warning filter.

# What ``Image.format`` may say for each sniffed format: Pillow reads a JPEG carrying an MPO index as "MPO".
_PILLOW_FORMATS = {"PNG": ("PNG",), "JPEG": ("JPEG", "MPO"), "WEBP": ("WEBP",)}


def _pillow_decode(data: bytes, fmt: str, declared: tuple[int, int], images: int) -> Image.Image:
    """Open, check, fully decode, orient and convert; every Pillow failure becomes a refusal."""
    # Pillow warnings (e.g. slightly corrupt EXIF, common in real phone photos) are not reasons to refuse an
    # image whose pixels decode.
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as opened:
            _check_opened(opened, fmt, declared, images)
            opened.load()  # the full decode; a truncated or damaged file fails here
            oriented = ImageOps.exif_transpose(opened)
        return _to_rgb_or_rgba(oriented)
    except _Refused:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        raise _Refused(f"could not be decoded as {_display(fmt)} ({_describe(exc)}); {_COMPLETE}") from None


def _check_opened(image: Image.Image, fmt: str, declared: tuple[int, int], images: int) -> None:
    if image.format not in _PILLOW_FORMATS[fmt]:
        raise _Refused(f"starts like {_display(fmt)} but reads as {image.format}; {_COMPLETE}")
    if image.size != declared:
        raise _Refused(
            f"declares {declared[0]}×{declared[1]} but decodes as {image.width}×{image.height} (damaged); {_COMPLETE}"
        )
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":
        raise _Refused(
            f"is an animated {_display(fmt)} with {frames} frames; accepted: a single still PNG, JPEG or WebP image"
        )
    if images > 1 and image.format != "MPO":  # concatenated JPEGs without an MPO index: appended data
        raise _Refused(
            f"holds {images} JPEG images back to back (appended data is not accepted); "
            f"accepted: a PNG, JPEG or WebP file with nothing appended"
        )
    if image.format == "MPO" and frames != images:  # Pillow counts the MPO index; the walk counts what is there
        raise _Refused(
            f"is an MPO whose index lists {frames} images but which holds {images} (truncated or damaged); {_COMPLETE}"
        )


def _display(fmt: str) -> str:
    return "WebP" if fmt == "WEBP" else fmt


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):  # its message is the repr of our BytesIO: no use to a client
        return "Pillow cannot identify it"
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --- modes ------------------------------------------------------------------------------------------------------

_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
# 32-bit and 16-bit single-band modes: from PNG these only hold 16-bit grey samples, 0..65535.
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


def _to_rgb_or_rgba(image: Image.Image) -> Image.Image:
    """RGB, or RGBA when some pixel is not fully opaque (alpha channel, palette tRNS or a colour key)."""
    if image.mode in _WIDE_GREY_MODES:
        rgba = _wide_grey_to_rgba(image)
    elif image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # Pillow applies tRNS: palette alphas and grey or RGB colour keys
    else:
        return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV
    if rgba.getchannel("A").getextrema()[0] == 255:
        return rgba.convert("RGB")
    return rgba


def _wide_grey_to_rgba(image: Image.Image) -> Image.Image:
    # Pillow's own conversion of I;16 to L clips (32768 becomes 255) and its colour-key handling compares
    # clipped values; mapping every 16-bit value through a table scales properly (65535 -> 255, 32768 -> 128).
    wide = image if image.mode == "I" else image.convert("I")
    grey = wide.point(_grey16_to_8(), "L")
    key = image.info.get("transparency")
    if isinstance(key, int) and 0 <= key <= 0xFFFF:
        alpha = wide.point([0 if value == key else 255 for value in range(0x10000)], "L")
    else:
        alpha = Image.new("L", image.size, 255)
    return Image.merge("RGBA", (grey, grey, grey, alpha))


@functools.cache
def _grey16_to_8() -> tuple[int, ...]:
    return tuple((value + 128) // 257 for value in range(0x10000))


def _encode_png(image: Image.Image) -> bytes:
    # Pillow's PNG writer copies some of ``info`` (ICC profile, transparency) into chunks; the output must
    # carry pixels only, whatever the upload carried.
    image.info.clear()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- base64 -----------------------------------------------------------------------------------------------------

_DATA_URL = re.compile(r"data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_STANDARD = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_URLSAFE = re.compile(r"[A-Za-z0-9\-_]*={0,2}")


def decode_base64(text: str, field: str, limits: UploadLimits) -> bytes:
    """The bytes of a base64 upload: plain or a ``data:image/...;base64,`` URL, standard or URL-safe alphabet.

    Whitespace (line breaks included) is ignored and padding may be left out; anything else that is not base64
    is refused. The length is checked against ``limits.max_bytes`` before anything is decoded.
    """
    if not isinstance(text, str):
        raise InvalidRequestError([FieldProblem(field, f"must be a base64 string, not {type(text).__name__}")])
    encoded_cap = 4 * -(-limits.max_bytes // 3)  # the padded length of a max_bytes file
    # A cheap first bound before any copy of the text: room for a line break every 16 characters and a header.
    if len(text) > encoded_cap + encoded_cap // 8 + 1024:
        raise UploadTooLargeError(field, len(text), encoded_cap, "base64 characters")
    try:
        payload = _WHITESPACE.sub("", _base64_payload(text.strip()))
        size = _decoded_length(payload)
        if size > limits.max_bytes:
            raise UploadTooLargeError(field, size, limits.max_bytes)
        return _strict_b64decode(payload)
    except _Refused as refused:
        raise InvalidRequestError([FieldProblem(field, str(refused))]) from None


def _base64_payload(text: str) -> str:
    """The base64 part of ``text``: after the comma of a data URL, else all of it."""
    if text[:5].lower() != "data:":
        if not text:
            raise _Refused("is empty; accepted: a base64-encoded PNG, JPEG or WebP file, or a data: URL of one")
        return text
    match = _DATA_URL.match(text)
    if match is None:
        raise _Refused("is a data: URL without a comma; accepted: data:image/png;base64,<base64>")
    media_type = match.group(1).strip().lower()
    parameters = [p.strip().lower() for p in match.group(2).split(";")[1:]]
    if not media_type.startswith("image/"):
        shown = media_type or "text/plain (none given)"
        raise _Refused(f"is a data: URL of {shown}; accepted: an image/* media type (PNG, JPEG or WebP)")
    if parameters[-1:] != ["base64"]:
        raise _Refused("is a data: URL that is not base64-encoded; accepted: data:image/png;base64,<base64>")
    payload = text[match.end() :]
    if not payload.strip():
        raise _Refused("is a data: URL with no data after the comma; accepted: data:image/png;base64,<base64>")
    return payload


def _decoded_length(payload: str) -> int:
    """How many bytes ``payload`` decodes to, worked out from its length alone."""
    unpadded = len(payload.rstrip("="))
    return unpadded // 4 * 3 + max(0, unpadded % 4 - 1)


def _strict_b64decode(payload: str) -> bytes:
    if _STANDARD.fullmatch(payload):
        alphabet = "standard"
    elif _URLSAFE.fullmatch(payload):
        alphabet = "URL-safe"
        payload = payload.translate(str.maketrans("-_", "+/"))
    else:
        raise _Refused(
            "is not valid base64 (characters outside the standard or URL-safe alphabet, mixed alphabets, or "
            "misplaced '=' padding); accepted: base64 of a PNG, JPEG or WebP file"
        )
    unpadded = payload.rstrip("=")
    if len(unpadded) % 4 == 1 or (len(payload) != len(unpadded) and len(payload) % 4 != 0):
        raise _Refused(
            f"is not valid {alphabet} base64 (its length does not fit whole bytes); "
            "accepted: base64 of a PNG, JPEG or WebP file"
        )
    try:
        return base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Refused(
            f"is not valid {alphabet} base64 ({exc}); accepted: base64 of a PNG, JPEG or WebP file"
        ) from None
