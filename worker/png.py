"""PNG encoding with the generation parameters as text chunks.

The same pixels and parameters always give the same bytes (no timestamps),
so the same request and seed through the service give byte-identical files.
"""

from __future__ import annotations

import io
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from diffq.app import __version__
from diffq.app.contract.records import JobParams, ModelRecord
from diffq.app.provenance.labels import PNG_XMP_KEY


def png_text(params: JobParams, seed: int, model: ModelRecord) -> dict[str, str]:
    """What to write into one image's tEXt chunks: enough to reproduce it (with the same inputs)."""
    text = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "steps": str(params.steps),
        "scheduler": params.scheduler,
        "guidance_scale": repr(params.guidance_scale),
        "seed": str(seed),
        "width": str(params.width),
        "height": str(params.height),
        "model": model.name,
        "weights_hash": model.weights_hash,
        "diffq_version": __version__,
        "Software": f"diffq {__version__}",
        "mode": params.mode.value,
    }
    if params.strength is not None:
        text["strength"] = repr(params.strength)
    if params.outpaint is not None:
        text["outpaint"] = json.dumps(params.outpaint.model_dump(), separators=(",", ":"))
    if params.loras:  # which adapters, how strongly, and exactly which files
        text["loras"] = json.dumps([lora.model_dump() for lora in params.loras], separators=(",", ":"))
    for name in ("image", "mask"):
        source = getattr(params, name)
        if source is not None:  # which input: its hash, and where it came from
            text[f"{name}_sha256"] = source.sha256
            text[f"{name}_source"] = source.source
    return text


def encode_png(image: Image.Image, text: dict[str, str] | None, xmp: str | None = None) -> bytes:
    """PNG bytes of ``image``; ``text`` becomes tEXt chunks (iTXt where not Latin-1), ``xmp`` an
    uncompressed iTXt chunk under the XMP key, where XMP readers look for it."""
    info = None
    if text or xmp:
        info = PngInfo()
        for key, value in (text or {}).items():
            info.add_text(key, value)  # falls back to iTXt for non-Latin-1 values
        if xmp:
            info.add_itxt(PNG_XMP_KEY, xmp)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


#: Milliseconds each journey frame shows; the last (the finished picture) stays longer.
JOURNEY_FRAME_MS = 120
JOURNEY_LAST_FRAME_MS = 1500


def encode_journey(frames: list[Image.Image]) -> bytes:
    """An animated WebP of the clean-image estimate over the steps, looping."""
    durations = [JOURNEY_FRAME_MS] * (len(frames) - 1) + [JOURNEY_LAST_FRAME_MS]
    buffer = io.BytesIO()
    frames[0].save(
        buffer, format="WEBP", save_all=True, append_images=frames[1:], duration=durations, loop=0, lossless=True
    )
    return buffer.getvalue()
