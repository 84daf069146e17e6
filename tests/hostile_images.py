"""A corpus of hostile and of valid uploads for ``diffq.app.core.uploads``, built in memory (no files on disk).

``hostile_cases`` returns what the API must refuse, each with the status it must answer: 413 for the size cap,
422 for everything else. ``valid_cases`` returns what it must accept, with the size (after EXIF orientation)
and transparency each must decode to. Everything is small and deterministic; the "bombs" are tiny files that
declare huge images.

Not collected by pytest (no ``test_`` prefix); ``tests/test_uploads.py`` uses it.
"""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from dataclasses import dataclass

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIZE = (40, 24)  # wider than high, so an EXIF rotation shows in the decoded size

# Colours of the four quadrants of ``quadrants()``: far apart, so JPEG and lossy WebP keep them recognisable.
TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT = (230, 20, 20), (20, 200, 20), (20, 20, 230), (240, 240, 240)


@dataclass(frozen=True)
class Case:
    """One upload the API must refuse."""

    name: str
    data: bytes
    status: int  # 413 or 422: what the API must answer


# --- building blocks --------------------------------------------------------------------------------------------


def chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def ihdr(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))


def raw_png(width: int, height: int, idat: bytes, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG written chunk by chunk, so the header may say anything."""
    return PNG_SIGNATURE + ihdr(width, height, bit_depth, colour_type) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def quadrants(size: tuple[int, int] = SIZE) -> Image.Image:
    """An RGB image whose four quadrants have the colours above: any rotation or flip is visible."""
    image = Image.new("RGB", size, BOTTOM_RIGHT)
    half_w, half_h = size[0] // 2, size[1] // 2
    image.paste(TOP_LEFT, (0, 0, half_w, half_h))
    image.paste(TOP_RIGHT, (half_w, 0, size[0], half_h))
    image.paste(BOTTOM_LEFT, (0, half_h, half_w, size[1]))
    return image


def orientation_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk of a well-formed PNG."""
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def replace_chunk(data: bytes, kind: bytes, payload: bytes | None = None, *, crc: int | None = None) -> bytes:
    """``data`` with the first ``kind`` chunk's payload (and optionally its CRC) replaced."""
    out, pos = bytearray(data[: len(PNG_SIGNATURE)]), len(PNG_SIGNATURE)
    done = False
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        this = data[pos + 4 : pos + 8]
        if this == kind and not done:
            body = data[pos + 8 : pos + 8 + length] if payload is None else payload
            whole = chunk(kind, body)
            if crc is not None:
                whole = whole[:-4] + struct.pack(">I", crc)
            out += whole
            done = True
        else:
            out += data[pos : pos + 12 + length]
        pos += 12 + length
    return bytes(out)


def jpeg_segment(data: bytes, marker: int) -> int:
    """Offset of the first FFxx ``marker`` in a well-formed JPEG's headers."""
    return data.index(bytes([0xFF, marker]))


def icc_profile() -> bytes:
    """An sRGB ICC profile: Pillow keeps it in ``info`` and its PNG writer would copy it into an iCCP chunk."""
    try:
        from PIL import ImageCms

        return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    except ImportError:  # a Pillow built without littlecms: any bytes do, nothing parses them
        return b"\x00\x00\x02\x30not a real profile" + bytes(540)


def zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("payload.html", "<script>alert(1)</script>")
    return buffer.getvalue()


def zip_in_private_chunk() -> bytes:
    """A PNG that is also a ZIP (lenient readers find the archive inside a private ancillary chunk).

    Structurally a valid PNG with nothing appended, so it is accepted; the re-encoded PNG drops the chunk.
    """
    png = encode(quadrants(), "PNG")
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + chunk(b"zipP", zip_bytes()) + png[iend:]


def idat_bomb(width: int, height: int, extra_bytes: int) -> bytes:
    """An 8-bit grey PNG whose IDAT inflates to ``extra_bytes`` more than the image needs (tiny when compressed)."""
    compressor = zlib.compressobj(9)
    parts = [compressor.compress((b"\x00" + b"\x80" * width) * height)]
    block = bytes(1 << 20)
    for _ in range(extra_bytes >> 20):
        parts.append(compressor.compress(block))
    parts.append(compressor.flush())
    return raw_png(width, height, b"".join(parts), colour_type=0)


# --- valid uploads ----------------------------------------------------------------------------------------------


def valid_cases() -> list[tuple[str, bytes, tuple[int, int], bool]]:
    """(name, data, expected (width, height) after EXIF orientation, expected has_alpha)."""
    rgb = quadrants()
    width, height = SIZE
    rotated = (height, width)

    transparent = rgb.convert("RGBA")
    transparent.putpixel((0, 0), (0, 0, 0, 0))
    transparent.putpixel((1, 0), (255, 0, 0, 128))
    palette = rgb.quantize(4)
    palette_trns = encode(palette, "PNG", transparency=0)
    grey16 = Image.new("I;16", SIZE, 0)
    for x, value in enumerate((65535, 32768, 257, 0)):
        grey16.putpixel((x, 0), value)
    grey_alpha = Image.new("LA", SIZE, (100, 255))
    grey_alpha.putpixel((5, 5), (100, 0))
    one_bit = Image.new("1", SIZE, 0)
    one_bit.putpixel((3, 3), 1)
    keyed = encode(rgb, "PNG", transparency=TOP_LEFT)  # tRNS colour key: the top-left quadrant is transparent
    mpo = encode(rgb, "MPO", save_all=True, append_images=[Image.new("RGB", SIZE, (0, 0, 0))])
    lossy_alpha = rgb.convert("RGBA")
    lossy_alpha.putalpha(Image.new("L", SIZE, 90))

    return [
        ("png_rgb", encode(rgb, "PNG"), SIZE, False),
        ("png_rgba_transparent", encode(transparent, "PNG"), SIZE, True),
        ("png_rgba_opaque", encode(rgb.convert("RGBA"), "PNG"), SIZE, False),
        ("png_palette", encode(palette, "PNG"), SIZE, False),
        ("png_palette_trns", palette_trns, SIZE, True),
        ("png_grey", encode(rgb.convert("L"), "PNG"), SIZE, False),
        ("png_grey16", encode(grey16, "PNG"), SIZE, False),
        ("png_grey16_colour_key", encode(grey16, "PNG", transparency=32768), SIZE, True),
        ("png_grey_alpha", encode(grey_alpha, "PNG"), SIZE, True),
        ("png_1bit", encode(one_bit, "PNG"), SIZE, False),
        ("png_rgb_colour_key", keyed, SIZE, True),
        ("png_exif_orientation_6", encode(rgb, "PNG", exif=orientation_exif(6)), rotated, False),
        ("png_zip_in_private_chunk", zip_in_private_chunk(), SIZE, False),
        ("png_idat_inflates_past_image", idat_bomb(width, height, 64 << 20), SIZE, False),
        ("jpeg_rgb", encode(rgb, "JPEG", quality=95), SIZE, False),
        ("jpeg_exif_orientation_6", encode(rgb, "JPEG", quality=95, exif=orientation_exif(6)), rotated, False),
        ("jpeg_exif_orientation_3", encode(rgb, "JPEG", quality=95, exif=orientation_exif(3)), SIZE, False),
        ("jpeg_cmyk", encode(rgb.convert("CMYK"), "JPEG", quality=95), SIZE, False),
        ("jpeg_icc_profile", encode(rgb, "JPEG", quality=95, icc_profile=icc_profile()), SIZE, False),
        ("jpeg_grey", encode(rgb.convert("L"), "JPEG", quality=95), SIZE, False),
        ("jpeg_progressive", encode(rgb, "JPEG", quality=95, progressive=True), SIZE, False),
        ("jpeg_restart_markers", encode(rgb, "JPEG", quality=95, restart_marker_rows=1), SIZE, False),
        ("jpeg_mpo_two_frames", mpo, SIZE, False),
        ("webp_lossy", encode(rgb, "WEBP", quality=90), SIZE, False),
        ("webp_lossy_alpha", encode(lossy_alpha, "WEBP", quality=90), SIZE, True),
        ("webp_lossless_alpha", encode(transparent, "WEBP", lossless=True), SIZE, True),
        ("webp_exif_orientation_6", encode(rgb, "WEBP", quality=90, exif=orientation_exif(6)), rotated, False),
    ]


# --- hostile uploads --------------------------------------------------------------------------------------------


def hostile_cases(max_bytes: int, max_pixels: int, max_side: int) -> list[Case]:
    """Uploads the API must refuse under these limits, with the status each must get."""
    assert max_side < 65500 and max_pixels < 100_000 * 100_000 and max_bytes > 200_000, "limits too loose"
    return [
        *_container_cases(),
        *_png_cases(max_bytes, max_pixels, max_side),
        *_jpeg_cases(),
        *_webp_cases(),
        *_other_format_cases(),
    ]


def _container_cases() -> list[Case]:
    return [
        Case("empty", b"", 422),
        Case("one_byte", b"\x89", 422),
        Case("png_signature_only", PNG_SIGNATURE, 422),
        Case("jpeg_soi_only", b"\xff\xd8", 422),
        Case("jpeg_soi_and_marker_start", b"\xff\xd8\xff", 422),
        Case("riff_only", b"RIFF", 422),
    ]


def _png_cases(max_bytes: int, max_pixels: int, max_side: int) -> list[Case]:
    png = encode(quadrants(), "PNG")
    idat = png.index(b"IDAT") - 4
    iend = png.rindex(b"IEND") - 4
    (idat_length,) = struct.unpack_from(">I", png, idat)
    idat_crc = struct.unpack_from(">I", png, idat + 8 + idat_length)[0]
    grey_rows = zlib.compress(b"\x00" * 5)  # one 4-pixel row of grey: enough for the header tests
    frame_a, frame_b = quadrants(), Image.new("RGB", SIZE, (0, 0, 0))

    cases = [
        Case("png_cut_in_ihdr", png[:20], 422),
        Case("png_cut_in_idat", png[: idat + 8 + idat_length // 2], 422),
        Case("png_cut_before_iend", png[:iend], 422),
        Case("png_bad_crc_idat", replace_chunk(png, b"IDAT", crc=idat_crc ^ 1), 422),
        Case("png_bad_crc_ihdr", replace_chunk(png, b"IHDR", crc=0), 422),
        Case("png_width_zero", raw_png(0, 1, grey_rows, colour_type=0), 422),
        Case("png_height_zero", raw_png(4, 0, grey_rows, colour_type=0), 422),
        Case("png_header_100000x100000", raw_png(100_000, 100_000, grey_rows, colour_type=0), 422),
        Case("png_header_2pow31_wide", raw_png(2**31, 1, grey_rows, colour_type=0), 422),
        Case("png_65535x1_beyond_max_side", raw_png(65535, 1, grey_rows, colour_type=0), 422),
        Case("png_bad_bit_depth", raw_png(4, 1, grey_rows, bit_depth=7, colour_type=2), 422),
        Case("png_bad_colour_type", raw_png(4, 1, grey_rows, colour_type=5), 422),
        Case("png_idat_not_zlib", raw_png(4, 1, b"this is not zlib data", colour_type=0), 422),
        Case("png_no_idat", PNG_SIGNATURE + ihdr(4, 1, colour_type=0) + chunk(b"IEND", b""), 422),
        Case("png_first_chunk_not_ihdr", PNG_SIGNATURE + chunk(b"tEXt", b"a\x00b") + png[8:], 422),
        Case("png_chunk_length_past_end", png[:idat] + struct.pack(">I", 0x7FFFFFF0) + png[idat + 4 :], 422),
        Case("png_zip_appended", png + zip_bytes(), 422),
        Case("png_html_appended", png + b"<html><script>alert(1)</script></html>", 422),
        Case("png_garbage_after_iend", png + b"\x00garbage", 422),
        Case("png_png_appended", png + png, 422),
        Case("png_wrong_magic", b"\x8a" + png[1:], 422),
        Case("apng_two_frames", encode(frame_a, "PNG", save_all=True, append_images=[frame_b]), 422),
        Case("png_over_max_bytes", PNG_SIGNATURE + bytes(max_bytes + 1 - len(PNG_SIGNATURE)), 413),
        Case("png_huge_text_chunk", png[:iend] + chunk(b"tEXt", b"k\x00" + b"x" * max_bytes) + png[iend:], 413),
        # Structure no real file has, which Pillow would walk in Python for seconds (see the caps in uploads).
        Case("png_65537_empty_chunks", png[:idat] + chunk(b"zzZz", b"") * 65_537 + png[idat:], 422),
    ]
    # A real zlib bomb: a complete, valid image just over the pixel cap that compresses to almost nothing.
    width = min(max_side, max_pixels)
    height = max_pixels // width + 1
    if height <= max_side:
        cases.append(Case("png_zlib_bomb_over_max_pixels", idat_bomb(width, height, 0), 422))
    return cases


def _jpeg_cases() -> list[Case]:
    jpeg = encode(quadrants(), "JPEG", quality=90)
    sof = jpeg_segment(jpeg, 0xC0)
    sos = jpeg_segment(jpeg, 0xDA)
    (sos_length,) = struct.unpack_from(">H", jpeg, sos + 2)
    scan = sos + 2 + sos_length
    app0 = jpeg_segment(jpeg, 0xE0)
    (sof_length,) = struct.unpack_from(">H", jpeg, sof + 2)

    def with_size(width: int, height: int) -> bytes:
        return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]

    # A progressive scan bomb: libjpeg makes a pass over the whole image for each scan, however small.
    progressive = encode(quadrants(), "JPEG", quality=90, progressive=True)
    last_scan = progressive[progressive.rindex(b"\xff\xda") : -2]
    scan_bomb = progressive[:-2] + last_scan * 101 + b"\xff\xd9"

    return [
        Case("jpeg_soi_eoi", b"\xff\xd8\xff\xd9", 422),
        Case("jpeg_truncated_half", jpeg[: len(jpeg) // 2], 422),
        Case("jpeg_cut_in_headers", jpeg[: sos + 4], 422),
        Case("jpeg_no_eoi", jpeg[:-2], 422),
        Case("jpeg_header_65500x65500", with_size(65500, 65500), 422),
        Case("jpeg_width_zero", with_size(0, 24), 422),
        Case("jpeg_segment_length_past_end", jpeg[: app0 + 2] + b"\xff\xff" + jpeg[app0 + 4 :], 422),
        Case("jpeg_scan_without_frame_header", jpeg[:sof] + jpeg[sof + 2 + sof_length :], 422),
        Case("jpeg_soi_inside_scan", jpeg[: scan + 10] + b"\xff\xd8" + jpeg[scan + 12 :], 422),
        Case("jpeg_zip_appended", jpeg + zip_bytes(), 422),
        Case("jpeg_html_appended", jpeg + b"<html><script>alert(1)</script></html>", 422),
        Case("jpeg_jpeg_appended_without_mpo_index", jpeg + jpeg, 422),
        Case("jpeg_scan_bomb_101_more_scans", scan_bomb, 422),
        Case("jpeg_4097_comment_segments", jpeg[:sos] + b"\xff\xfe\x00\x02" * 4097 + jpeg[sos:], 422),
        Case("jpeg_padded_with_fill_bytes", jpeg[:sos] + b"\xff" * 2000 + jpeg[sos:], 422),
        Case("jpeg_wrong_magic", b"\x00" + jpeg[1:], 422),
    ]


def _webp_cases() -> list[Case]:
    webp = encode(quadrants(), "WEBP", quality=90)
    with_exif = encode(quadrants(), "WEBP", quality=90, exif=orientation_exif(1))  # VP8X: a 24-bit canvas size
    assert with_exif[12:16] == b"VP8X"
    huge_canvas = with_exif[:24] + (99_999).to_bytes(3, "little") * 2 + with_exif[30:]
    first_chunk_length = struct.unpack_from("<I", webp, 16)[0]
    animated = encode(
        quadrants(), "WEBP", save_all=True, append_images=[Image.new("RGB", SIZE, (0, 0, 0))], duration=100
    )
    return [
        Case("webp_truncated", webp[: len(webp) // 2], 422),
        Case("webp_riff_size_mismatch_trailing_zip", webp + zip_bytes(), 422),
        Case("webp_riff_size_past_end", webp[:4] + struct.pack("<I", len(webp) + 100) + webp[8:], 422),
        Case("webp_chunk_length_past_riff", webp[:16] + struct.pack("<I", first_chunk_length + 64) + webp[20:], 422),
        Case("webp_header_100000x100000", huge_canvas, 422),
        Case("webp_animated", animated, 422),
        Case("webp_wrong_fourcc", webp[:8] + b"WEBX" + webp[12:], 422),
    ]


def _other_format_cases() -> list[Case]:
    small = quadrants((8, 8))
    noise = random.Random(20240601).randbytes(1000)
    assert not noise.startswith((PNG_SIGNATURE, b"\xff\xd8\xff", b"RIFF"))
    return [
        Case("gif", encode(small, "GIF"), 422),
        Case("bmp", encode(small, "BMP"), 422),
        Case("tiff", encode(small, "TIFF"), 422),
        Case("ico", encode(small, "ICO"), 422),
        Case("svg_text", b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', 422),
        Case("svg_with_xml_declaration", b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', 422),
        Case("html_text", b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>", 422),
        Case("pdf_header", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", 422),
        Case("zip_file", zip_bytes(), 422),
        Case("avif_ftyp", b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf", 422),
        Case("heic_ftyp", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", 422),
        Case("plain_text_hello", b"hello", 422),
        Case("random_bytes", noise, 422),
    ]
