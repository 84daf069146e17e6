"""Input images of editing jobs: where they come from, checks, and what the worker gets.

An input arrives as a multipart file part, as base64 (or a data: URL) in the
JSON body, or as ``job:<id>/<n>``, image n of an earlier job (so edits chain
without a re-upload; the bytes are copied, so the new job does not depend on
the old one's lifetime). A reference obeys the same visibility rule as
``GET /v1/jobs/{id}``: another API key's job answers exactly as a job that does
not exist, so a reference is neither a way to read another tenant's images nor
an oracle of which job ids exist. Every input goes through ``diffq.app.core.uploads``'s
checks and is stored re-encoded: the worker only ever sees a plain RGB PNG
and a greyscale mask of the exact output geometry.

Size rules, so that nothing is silently changed:

- Without ``resize`` the output is the input's size (plus the outpainting
  border); ``width``/``height`` may be sent but must agree, and a mask must
  match the image.
- With ``resize: true`` the image (and mask) are scaled to ``width`` ×
  ``height`` (the model's default where omitted); for outpainting, so that
  the enlarged canvas is that size.

Transparency is explicit: ``mask: "alpha"`` repaints the transparent part of
an RGBA image (keep the product, regenerate its background); otherwise
transparent pixels are composited onto white and the job says so in a
warning.

Runs in the request's worker thread (the POST route is a plain ``def``), so
decoding never blocks the API's event loop. Uses Pillow only (no numpy).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from diffq.app.contract.records import InputImage, JobMode, JobRecord, ModelRecord, Outpaint
from diffq.app.contract.rules import USED_BY
from diffq.app.core.errors import FieldProblem, InvalidRequestError
from diffq.app.core.uploads import UploadLimits, check_header, decode_base64, decode_image
from diffq.app.schemas.jobs import JobCreate
from diffq.app.settings import Settings

#: Whether the caller may see a job with this owner (``Caller.can_see``).
CanSee = Callable[[str | None], bool]

JOB_REFERENCE = re.compile(r"^job:([0-9a-f]{32})/(\d{1,4})$")
ALPHA_MASK = "alpha"


class ImageSource(Protocol):
    """Where ``job:<id>/<n>`` inputs are read from (the job service, through the result store)."""

    def get(self, job_id: str) -> JobRecord | None: ...

    def image(self, job_id: str, index: int) -> bytes | None: ...


@dataclass(frozen=True)
class PreparedInputs:
    """What an editing request resolves to; for text-to-image only ``mode`` is set."""

    mode: JobMode
    size: tuple[int, int] | None = None  # output width, height
    image: InputImage | None = None
    mask: InputImage | None = None
    pngs: dict[str, bytes] = field(default_factory=dict)  # name ("image", "mask") -> PNG to store
    warnings: list[str] = field(default_factory=list)


def infer_mode(body: JobCreate, files: Mapping[str, bytes]) -> JobMode:
    """The explicit mode, else the one the inputs imply (image+mask: inpaint, image+outpaint: outpaint)."""
    if body.mode is not None:
        return body.mode
    if body.image is None and "image" not in files:
        return JobMode.TXT2IMG
    if body.outpaint is not None:
        return JobMode.OUTPAINT
    if body.mask is not None or "mask" in files:
        return JobMode.INPAINT
    return JobMode.IMG2IMG


def prepare_inputs(
    body: JobCreate,
    files: Mapping[str, bytes],
    model: ModelRecord,
    settings: Settings,
    store: ImageSource,
    can_see: CanSee = lambda owner: True,
) -> PreparedInputs:
    """Check the request's mode and inputs against the model; decode, normalise and size them.

    Cheap checks come first for every input (fields, references, encoded sizes, the sizes the
    files' headers declare), and only then is anything decoded."""
    mode = infer_mode(body, files)
    _check_fields(body, files, mode, model)
    if mode is JobMode.TXT2IMG:
        return PreparedInputs(mode=mode)

    limits = upload_limits(body, model, settings)
    alpha_mask = mode is JobMode.INPAINT and body.mask == ALPHA_MASK and "mask" not in files
    raw = {"image": _raw("image", body.image, files, limits, store, can_see)}
    if mode is JobMode.INPAINT and not alpha_mask:
        raw["mask"] = _raw("mask", body.mask, files, limits, store, can_see)
    for name, (data, _) in raw.items():
        check_header(data, name, limits)

    image, image_source = _decoded("image", raw["image"], limits)
    warnings: list[str] = []
    mask, mask_source = None, None
    if alpha_mask:
        if "A" not in image.getbands():
            raise _problem("mask", '"alpha" needs an image with transparency; this image has none')
        mask, mask_source = _mask_from_alpha(image), ALPHA_MASK
    elif mode is JobMode.INPAINT:
        loaded, mask_source = _decoded("mask", raw["mask"], limits)
        mask = _as_mask(loaded)
    if "A" in image.getbands():
        if mask_source != ALPHA_MASK:
            warnings.append(
                'image has transparency: transparent pixels were composited onto white (send mask "alpha" '
                "to repaint them instead)"
            )
        image = _onto_white(image)

    image, mask, size = _fit(body, mode, image, mask, model)
    pngs = {"image": _png(image)}
    image_info = InputImage(source=image_source, width=image.width, height=image.height, sha256=_sha(pngs["image"]))
    mask_info = None
    if mask is not None and mask_source is not None:  # set together
        pngs["mask"] = _png(mask)
        mask_info = InputImage(source=mask_source, width=mask.width, height=mask.height, sha256=_sha(pngs["mask"]))
    return PreparedInputs(mode=mode, size=size, image=image_info, mask=mask_info, pngs=pngs, warnings=warnings)


def has_inputs(body: JobCreate, files: Mapping[str, bytes]) -> bool:
    """Whether the request carries an image or mask that would be decoded."""
    return bool(files) or body.image is not None or (body.mask is not None and body.mask != ALPHA_MASK)


def upload_limits(body: JobCreate, model: ModelRecord, settings: Settings) -> UploadLimits:
    """What an input may be. Used as it is (no ``resize``), an image can be no larger than the
    model makes; one to be scaled has its own pixel cap (``max_resize_pixels``)."""
    if body.resize:
        return UploadLimits(settings.max_upload_bytes, settings.max_resize_pixels, settings.max_upload_side)
    side = max(1, min(settings.max_upload_side, model.max_size))
    hint = (
        f"model {model.name!r} makes images of at most {model.max_size}×{model.max_size}; send resize: true "
        f"(with width and height) to scale a larger image, up to {settings.max_resize_pixels} pixels"
    )
    return UploadLimits(settings.max_upload_bytes, min(settings.max_upload_pixels, side * side), side, hint)


def _check_fields(body: JobCreate, files: Mapping[str, bytes], mode: JobMode, model: ModelRecord) -> None:
    """The model offers the mode, and exactly the fields the mode uses are present."""
    if mode not in model.modes:
        offered = ", ".join(m.value for m in model.modes)
        raise _problem("mode", f"{mode.value} is not offered by model {model.name!r}; offered: {offered}")
    problems = []
    for name, modes in USED_BY.items():
        present = getattr(body, name) is not None or name in files
        if present and mode not in modes:
            used_by = ", ".join(m.value for m in modes)
            problems.append(FieldProblem(name, f"is only used by mode {used_by}, not {mode.value}"))
        elif not present and mode in modes and name != "strength":
            problems.append(FieldProblem(name, f"is required by mode {mode.value}"))
    if body.resize and mode is JobMode.TXT2IMG:
        problems.append(FieldProblem("resize", "only applies to an input image (modes img2img, inpaint, outpaint)"))
    if mode is JobMode.OUTPAINT and body.outpaint is not None and body.outpaint.is_empty:
        problems.append(FieldProblem("outpaint", "adds no pixels; give at least one of left, top, right, bottom > 0"))
    if problems:
        raise InvalidRequestError(problems)


def _raw(
    name: str, value: str | None, files: Mapping[str, bytes], limits: UploadLimits, store: ImageSource, can_see: CanSee
) -> tuple[bytes, str]:
    """One input's encoded bytes (file part, base64 or job reference) and where they came from."""
    if name in files:
        return files[name], "upload"
    if value is not None and value.startswith("job:"):
        return _referenced(name, value, store, can_see), value
    assert value is not None, f"{name}: neither a file nor a value (only inputs the request has are read)"
    return decode_base64(value, name, limits), "upload"


def _decoded(name: str, raw: tuple[bytes, str], limits: UploadLimits) -> tuple[Image.Image, str]:
    """Decode one input (already through ``check_header``) into an RGB or RGBA image."""
    data, source = raw
    decoded = decode_image(data, name, limits)
    image = Image.open(io.BytesIO(decoded.png))
    image.load()
    return image, source


def _referenced(name: str, value: str, store: ImageSource, can_see: CanSee) -> bytes:
    """Image n of a job the caller may see. Another key's job gets the very answer a missing job
    gets (one message, one status), so references tell nothing of other tenants' jobs."""
    match = JOB_REFERENCE.match(value)
    if match is None:
        raise _problem(
            name, f"{value!r} is not a job reference; write job:<job id>/<image index>, e.g. job:{'0' * 32}/0"
        )
    job_id, index = match.group(1), int(match.group(2))
    record = store.get(job_id)
    png = store.image(job_id, index) if record is not None and can_see(record.owner) else None
    if png is None:
        raise _problem(
            name, f"job {job_id!r} has no image {index} (never created, not finished, out of range, expired or deleted)"
        )
    return png


def _as_mask(image: Image.Image) -> Image.Image:
    """Greyscale, white = repaint; a transparent part of a mask counts as black (keep)."""
    if "A" in image.getbands():
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, image.convert("RGBA"))
    return image.convert("L")


def _mask_from_alpha(image: Image.Image) -> Image.Image:
    """Opaque pixels (the product) are kept, transparent ones repainted."""
    return image.getchannel("A").point(lambda alpha: 0 if alpha >= 128 else 255)


def _onto_white(image: Image.Image) -> Image.Image:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def _fit(
    body: JobCreate, mode: JobMode, image: Image.Image, mask: Image.Image | None, model: ModelRecord
) -> tuple[Image.Image, Image.Image | None, tuple[int, int]]:
    """Resize (only if asked) and check the output geometry; returns image, mask and output size."""
    pad = body.outpaint or Outpaint()
    extra = (pad.left + pad.right, pad.top + pad.bottom)
    if body.resize:
        size = (body.width or model.default_width, body.height or model.default_height)
        inner = (size[0] - extra[0], size[1] - extra[1])
        if min(inner) < 1:
            raise _problem("outpaint", f"leaves no room for the image inside {size[0]}×{size[1]}")
        image = image.resize(inner, Image.Resampling.LANCZOS)
        mask = mask.resize(inner, Image.Resampling.NEAREST) if mask is not None else None
        return image, mask, size  # width and height are checked against the model with the rest

    if mask is not None and mask.size != image.size:
        raise _problem(
            "mask",
            f"is {mask.width}×{mask.height} but the image is {image.width}×{image.height}; send a mask "
            "of the image's size, or resize: true to scale both",
        )
    size = (image.width + extra[0], image.height + extra[1])
    for name, asked, actual in (("width", body.width, size[0]), ("height", body.height, size[1])):
        if asked is not None and asked != actual:
            raise _problem(
                name,
                f"is {asked} but {mode.value} of a {image.width}×{image.height} image makes "
                f"{size[0]}×{size[1]}; omit width and height, or send resize: true to scale the image",
            )
    _check_size(size, model, "outpaint" if mode is JobMode.OUTPAINT else "image")
    return image, mask, size


def _check_size(size: tuple[int, int], model: ModelRecord, name: str) -> None:
    lo, hi, multiple = model.min_size, model.max_size, model.size_multiple
    if all(lo <= side <= hi and side % multiple == 0 for side in size):
        return
    raise _problem(
        name,
        f"makes a {size[0]}×{size[1]} image; model {model.name!r} makes widths and heights that are "
        f"multiples of {multiple} between {lo} and {hi} (resize: true with width and height scales the input)",
    )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _problem(name: str, message: str) -> InvalidRequestError:
    return InvalidRequestError([FieldProblem(name, message)])
