"""app/core/uploads.py: hostile uploads are refused with the right error, valid ones decode to plain PNGs."""

from __future__ import annotations

import base64
import hashlib
import io
import random
import struct
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

from diffq.app.api.errors import ERROR_RESPONSES, install_error_handlers
from diffq.app.core import uploads
from diffq.app.core.errors import FieldProblem, InvalidRequestError, UploadTooLargeError
from diffq.app.core.uploads import DecodedImage, UploadLimits, decode_base64, decode_image
from tests.hostile_images import (
    BOTTOM_LEFT,
    BOTTOM_RIGHT,
    PNG_SIGNATURE,
    SIZE,
    TOP_LEFT,
    TOP_RIGHT,
    Case,
    encode,
    hostile_cases,
    orientation_exif,
    png_chunks,
    quadrants,
    valid_cases,
)

FIELD = "image"
LIMITS = UploadLimits(max_bytes=1_000_000, max_pixels=4_000_000, max_side=4096)
HOSTILE = hostile_cases(LIMITS.max_bytes, LIMITS.max_pixels, LIMITS.max_side)
VALID = {name: (data, size, has_alpha) for name, data, size, has_alpha in valid_cases()}

# Tiny files that declare more pixels than the limits allow: refused from the header alone.
HEADER_BOMBS = [
    "png_header_100000x100000",
    "png_header_2pow31_wide",
    "png_65535x1_beyond_max_side",
    "png_zlib_bomb_over_max_pixels",
    "jpeg_header_65500x65500",
    "webp_header_100000x100000",
]


class MustNotRun(BaseException):
    """Raised by a patched function that must not run; a BaseException, so no ``except Exception`` hides it."""


def _decode(name: str) -> DecodedImage:
    return decode_image(VALID[name][0], FIELD, LIMITS)


def _reopen(decoded: DecodedImage) -> Image.Image:
    image = Image.open(io.BytesIO(decoded.png))
    image.load()
    return image


def _near(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 40) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- hostile uploads --------------------------------------------------------------------------------------------


def test_the_corpus_is_large_and_its_names_unique() -> None:
    names = [case.name for case in HOSTILE]
    assert len(names) >= 35
    assert len(set(names)) == len(names)
    assert set(HEADER_BOMBS) <= set(names)
    assert {case.status for case in HOSTILE} == {413, 422}


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
def test_hostile_upload_is_refused_with_its_status(case: Case) -> None:
    expected = UploadTooLargeError if case.status == 413 else InvalidRequestError

    started = time.perf_counter()
    with pytest.raises(expected) as raised:  # any other exception type fails the test
        decode_image(case.data, FIELD, LIMITS)

    assert time.perf_counter() - started < 2.0  # generous: the slowest takes milliseconds

    error = raised.value
    assert str(error).startswith(f"{FIELD}")
    if case.status == 413:
        assert not isinstance(error, InvalidRequestError)
        assert (error.field, error.size, error.limit) == (FIELD, len(case.data), LIMITS.max_bytes)
    else:
        [problem] = error.problems
        assert problem.field == FIELD
        assert "accepted" in problem.message
        assert "BytesIO" not in problem.message  # Pillow's "cannot identify" names our buffer


@pytest.mark.parametrize("name", HEADER_BOMBS)
def test_header_bombs_are_refused_before_any_pixel_is_decoded(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def load(self: Image.Image) -> None:
        raise MustNotRun(name)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(Image.Image, "load", load)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # our limits refuse them, not Pillow's guard
    data = next(case.data for case in HOSTILE if case.name == name)

    started = time.perf_counter()
    with pytest.raises(InvalidRequestError) as raised:
        decode_image(data, FIELD, LIMITS)

    assert time.perf_counter() - started < 0.5
    message = raised.value.problems[0].message
    assert f"at most {LIMITS.max_side} pixels" in message or f"at most {LIMITS.max_pixels} accepted" in message


def test_sizes_within_the_limits_are_checked_exactly() -> None:
    limits = UploadLimits(max_bytes=100_000, max_pixels=40 * 24, max_side=40)
    assert decode_image(VALID["png_rgb"][0], FIELD, limits).width == 40
    with pytest.raises(InvalidRequestError, match="is 40×24 = 960 pixels; at most 959 accepted"):
        decode_image(VALID["png_rgb"][0], FIELD, UploadLimits(100_000, 40 * 24 - 1, 40))
    with pytest.raises(InvalidRequestError, match="is 40×24; each side at most 39 pixels accepted"):
        decode_image(VALID["png_rgb"][0], FIELD, UploadLimits(100_000, 40 * 24, 39))


def test_size_cap_is_exact_and_checked_before_the_format() -> None:
    png = VALID["png_rgb"][0]
    assert decode_image(png, FIELD, UploadLimits(len(png), 10_000, 100)).width == 40
    with pytest.raises(UploadTooLargeError, match=f"image is {len(png)} bytes; at most {len(png) - 1} bytes"):
        decode_image(png, FIELD, UploadLimits(len(png) - 1, 10_000, 100))
    with pytest.raises(UploadTooLargeError):
        decode_image(b"GIF89a" + bytes(200), FIELD, UploadLimits(100, 10_000, 100))


def test_refusal_names_what_was_sent_and_what_is_accepted() -> None:
    gif = next(case.data for case in HOSTILE if case.name == "gif")
    with pytest.raises(InvalidRequestError) as raised:
        decode_image(gif, "mask", LIMITS)

    assert raised.value.problems == [FieldProblem("mask", "format GIF is not accepted; accepted: PNG, JPEG, WebP")]
    assert str(raised.value) == "mask: format GIF is not accepted; accepted: PNG, JPEG, WebP"


def test_a_photo_with_corrupt_exif_still_decodes_unrotated() -> None:
    # A JPEG whose EXIF block is cut short: Pillow warns ("Corrupt EXIF data") and goes on. Phone
    # photos have such blocks; their pixels are fine, so they are accepted, without the orientation.
    jpeg = encode(quadrants(), "JPEG", exif=orientation_exif(6))
    start = jpeg.index(b"Exif\x00\x00")
    (length,) = struct.unpack_from(">H", jpeg, start - 2)
    tiff = jpeg[start + 6 : start - 2 + length][:20]
    damaged = jpeg[: start - 2] + struct.pack(">H", 8 + len(tiff)) + b"Exif\x00\x00" + tiff + jpeg[start - 2 + length :]

    original = decode_image(jpeg, FIELD, LIMITS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoded = decode_image(damaged, FIELD, LIMITS)
    assert (decoded.width, decoded.height) == (original.height, original.width)  # not rotated


def test_warning_filters_are_left_as_they_were_even_under_concurrent_decodes() -> None:
    before = list(warnings.filters)
    cases = [VALID["jpeg_exif_orientation_6"][0], VALID["png_grey16"][0], HOSTILE[0].data, VALID["webp_lossy"][0]]

    def decode_all(_: int) -> int:
        done = 0
        for data in cases * 5:
            try:
                decode_image(data, FIELD, LIMITS)
            except InvalidRequestError:
                pass
            done += 1
        return done

    with ThreadPoolExecutor(4) as pool:
        assert sum(pool.map(decode_all, range(4))) == 4 * 20
    assert list(warnings.filters) == before


def test_non_bytes_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="must be image bytes, not str"):
        decode_image("not bytes", FIELD, LIMITS)  # type: ignore[arg-type]
    assert decode_image(bytearray(VALID["png_rgb"][0]), FIELD, LIMITS).width == 40


def test_every_truncation_of_a_valid_file_is_refused() -> None:
    for name, (data, _, _) in VALID.items():
        if len(data) > 4096:
            continue
        for end in range(len(data)):
            with pytest.raises(InvalidRequestError):
                decode_image(data[:end], FIELD, LIMITS)
                pytest.fail(f"{name} cut at {end} of {len(data)} bytes was accepted")


def test_damaged_files_decode_or_are_refused_and_nothing_else_escapes() -> None:
    # Pillow happily decodes some damage (bit flips in JPEG entropy data give odd pixels): either outcome is
    # fine, as long as the answer is a decoded image or an InvalidRequestError.
    rng = random.Random(7)
    outcomes = {"decoded": 0, "refused": 0}
    for data, _, _ in VALID.values():
        if len(data) > 4096:
            continue
        for _ in range(30):
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)
            try:
                decoded = decode_image(bytes(damaged), FIELD, LIMITS)
            except InvalidRequestError:
                outcomes["refused"] += 1
            else:
                assert decoded.png.startswith(PNG_SIGNATURE)
                outcomes["decoded"] += 1
    assert outcomes["refused"] > 0 and outcomes["decoded"] > 0


# --- valid uploads ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALID))
def test_valid_upload_decodes_to_a_plain_png(name: str) -> None:
    data, size, has_alpha = VALID[name]

    decoded = _decode(name)

    assert (decoded.width, decoded.height) == size
    assert decoded.has_alpha is has_alpha
    assert decoded.source_format == name.split("_")[0].upper()
    assert decoded.png.startswith(PNG_SIGNATURE)
    assert {kind for kind, _ in png_chunks(decoded.png)} <= {b"IHDR", b"IDAT", b"IEND"}  # no tEXt, eXIf, iCCP...
    assert decoded.sha256 == hashlib.sha256(decoded.png).hexdigest()
    image = _reopen(decoded)
    assert image.mode == ("RGBA" if has_alpha else "RGB")
    assert image.size == size


@pytest.mark.parametrize(
    ("name", "corners"),
    [
        ("jpeg_rgb", (TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT)),
        ("jpeg_mpo_two_frames", (TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT)),  # the first frame
        ("jpeg_cmyk", (TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT)),
        # Orientation 6: the stored image is turned a quarter clockwise to be shown upright.
        ("jpeg_exif_orientation_6", (BOTTOM_LEFT, TOP_LEFT, BOTTOM_RIGHT, TOP_RIGHT)),
        ("png_exif_orientation_6", (BOTTOM_LEFT, TOP_LEFT, BOTTOM_RIGHT, TOP_RIGHT)),
        ("webp_exif_orientation_6", (BOTTOM_LEFT, TOP_LEFT, BOTTOM_RIGHT, TOP_RIGHT)),
        ("jpeg_exif_orientation_3", (BOTTOM_RIGHT, BOTTOM_LEFT, TOP_RIGHT, TOP_LEFT)),
    ],
)
def test_pixels_are_oriented_as_the_exif_says(name: str, corners: tuple[tuple[int, int, int], ...]) -> None:
    image = _reopen(_decode(name)).convert("RGB")
    w, h = image.size
    found = [image.getpixel(xy) for xy in ((2, 2), (w - 3, 2), (2, h - 3), (w - 3, h - 3))]
    assert all(_near(actual, expected) for actual, expected in zip(found, corners, strict=True)), found


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    image = _reopen(_decode("png_grey16"))

    assert [image.getpixel((x, 0)) for x in range(4)] == [(255, 255, 255), (128, 128, 128), (1, 1, 1), (0, 0, 0)]


def test_16_bit_grey_colour_key_makes_exactly_that_value_transparent() -> None:
    # Pillow's own I;16 -> RGBA conversion compares clipped values: it would make the 0 pixels transparent.
    image = _reopen(_decode("png_grey16_colour_key"))

    assert [image.getpixel((x, 0)) for x in range(4)] == [
        (255, 255, 255, 255), (128, 128, 128, 0), (1, 1, 1, 255), (0, 0, 0, 255)
    ]


def test_transparency_survives_from_every_source() -> None:
    rgba = _reopen(_decode("png_rgba_transparent"))
    assert rgba.getpixel((0, 0))[3] == 0 and rgba.getpixel((1, 0)) == (255, 0, 0, 128)
    assert rgba.getpixel((30, 20))[3] == 255

    keyed = _reopen(_decode("png_rgb_colour_key"))  # tRNS colour key = the top-left quadrant's colour
    assert keyed.getpixel((2, 2))[3] == 0 and keyed.getpixel((30, 2))[3] == 255

    palette = _reopen(_decode("png_palette_trns"))
    assert palette.getchannel("A").getextrema() == (0, 255)

    grey_alpha = _reopen(_decode("png_grey_alpha"))
    assert grey_alpha.getpixel((5, 5)) == (100, 100, 100, 0) and grey_alpha.getpixel((0, 0)) == (100, 100, 100, 255)

    assert _reopen(_decode("webp_lossless_alpha")).getpixel((1, 0)) == (255, 0, 0, 128)


def test_a_zip_hidden_in_a_private_chunk_does_not_survive_re_encoding() -> None:
    data = VALID["png_zip_in_private_chunk"][0]
    assert b"PK\x03\x04" in data

    decoded = _decode("png_zip_in_private_chunk")

    assert b"PK\x03\x04" not in decoded.png and b"zipP" not in decoded.png


def test_idat_that_inflates_far_past_the_image_is_not_inflated() -> None:
    # 64 MiB of zeros after the pixels, in 64 KB: Pillow stops inflating once the declared image is full.
    started = time.perf_counter()
    decoded = _decode("png_idat_inflates_past_image")
    assert time.perf_counter() - started < 1.0
    assert (decoded.width, decoded.height) == SIZE


def test_decoding_is_deterministic() -> None:
    assert _decode("jpeg_rgb").sha256 == _decode("jpeg_rgb").sha256


# --- base64 -----------------------------------------------------------------------------------------------------


SMALL = UploadLimits(max_bytes=30, max_pixels=100, max_side=10)
RAW = bytes(range(251, 256)) + b"\xfb\xef\xbe" * 5  # bytes whose base64 holds "+" and "/" (or "-" and "_")


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(RAW).decode(),
        base64.urlsafe_b64encode(RAW).decode(),
        base64.b64encode(RAW).decode().rstrip("="),
        "data:image/png;base64," + base64.b64encode(RAW).decode(),
        "DATA:Image/JPEG;BASE64," + base64.b64encode(RAW).decode(),
        "data:image/webp;name=photo.webp;base64," + base64.urlsafe_b64encode(RAW).decode(),
        "  \n" + "\r\n".join(base64.b64encode(RAW).decode()[i : i + 8] for i in range(0, 28, 8)) + "\n\t ",
    ],
    ids=["plain", "urlsafe", "unpadded", "data-url", "data-url-upper-case", "data-url-parameters", "whitespace"],
)
def test_base64_is_decoded(text: str) -> None:
    assert decode_base64(text, FIELD, SMALL) == RAW


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        (" \n\t", "is empty"),
        ("data:image/png;base64,", "no data after the comma"),
        ("data:image/png;base64", "without a comma"),
        ("data:text/plain;base64,aGVsbG8=", "data: URL of text/plain"),
        ("data:;base64,aGVsbG8=", "data: URL of text/plain (none given)"),
        ("data:image/png,aGVsbG8=", "not base64-encoded"),
        ("aGVs$G8=", "not valid base64"),
        ("aGVs bG8*", "not valid base64"),
        ("ab+_", "mixed alphabets"),
        ("aGVsbG8=aGVsbG8=", "misplaced '=' padding"),
        ("aGVsb", "length does not fit whole bytes"),
        ("aGVsbG8==", "length does not fit whole bytes"),
    ],
)
def test_bad_base64_is_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        decode_base64(text, FIELD, SMALL)

    [problem] = raised.value.problems
    assert problem.field == FIELD
    assert message in problem.message and "accepted" in problem.message


@pytest.mark.parametrize("value", [None, b"aGVsbG8=", 42])
def test_base64_must_be_a_string(value: object) -> None:
    with pytest.raises(InvalidRequestError, match="must be a base64 string"):
        decode_base64(value, FIELD, SMALL)  # type: ignore[arg-type]


def test_base64_size_cap_is_exact_and_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    assert decode_base64(base64.b64encode(bytes(30)).decode(), FIELD, SMALL) == bytes(30)
    assert decode_base64(base64.b64encode(bytes(30)).decode().rstrip("="), FIELD, SMALL) == bytes(30)

    def b64decode(*args: object, **kwargs: object) -> bytes:
        raise MustNotRun("decoded before the size check")

    monkeypatch.setattr(base64, "b64decode", b64decode)
    with pytest.raises(UploadTooLargeError, match="image is 31 bytes; at most 30 bytes accepted"):
        decode_base64(base64.b64encode(bytes(31)).decode(), FIELD, SMALL)
    with pytest.raises(UploadTooLargeError, match="image is 31 bytes"):
        decode_base64("data:image/png;base64," + base64.b64encode(bytes(31)).decode().rstrip("="), FIELD, SMALL)

    huge = "A" * 50_000_000
    started = time.perf_counter()
    with pytest.raises(UploadTooLargeError, match="image is 50000000 base64 characters; at most 40 base64"):
        decode_base64(huge, FIELD, SMALL)
    assert time.perf_counter() - started < 0.1


def test_base64_data_url_of_a_real_image_round_trips_through_decode_image() -> None:
    data = VALID["webp_lossless_alpha"][0]
    text = "data:image/webp;base64," + base64.b64encode(data).decode()

    decoded = decode_image(decode_base64(text, FIELD, LIMITS), FIELD, LIMITS)

    assert (decoded.source_format, decoded.has_alpha) == ("WEBP", True)


# --- HTTP mapping -----------------------------------------------------------------------------------------------


def test_errors_map_to_413_and_422_with_the_error_body() -> None:
    app = FastAPI()
    install_error_handlers(app)
    bodies = {"big": PNG_SIGNATURE + bytes(LIMITS.max_bytes), "gif": b"GIF89a" + bytes(20)}

    @app.post("/decode/{name}")
    def decode(name: str) -> dict[str, int]:
        return {"width": decode_image(bodies[name], FIELD, LIMITS).width}

    client = TestClient(app)
    big, gif = client.post("/decode/big"), client.post("/decode/gif")

    assert big.status_code == 413 and 413 in ERROR_RESPONSES
    assert big.json()["code"] == "upload_too_large"
    assert big.json()["message"] == f"image is {LIMITS.max_bytes + 8} bytes; at most {LIMITS.max_bytes} bytes accepted"
    assert gif.status_code == 422
    assert gif.json()["fields"] == [
        {"field": FIELD, "message": "format GIF is not accepted; accepted: PNG, JPEG, WebP"}
    ]


def test_the_decoder_does_not_leave_pillow_globals_changed() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS is not None
