"""PNG encoding with the generation parameters as text chunks.

The same pixels and parameters always give the same bytes (no timestamps),
so the same request and seed through the service give byte-identical files.
"""

from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from app import __version__
from app.contract.records import JobParams, ModelRecord


def png_text(params: JobParams, seed: int, model: ModelRecord) -> dict[str, str]:
    """What to write into one image's tEXt chunks: enough to reproduce it."""
    return {
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
    }


def encode_png(image: Image.Image, text: dict[str, str] | None) -> bytes:
    """PNG bytes of ``image``; ``text`` becomes tEXt chunks (iTXt where not Latin-1)."""
    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)  # falls back to iTXt for non-Latin-1 values
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
