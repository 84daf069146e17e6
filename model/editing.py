"""Image editing inputs: the modes, mask handling, the outpainting canvas and paste-back.

Pure Pillow/NumPy (no torch), so the worker can prepare inputs before the
pipeline runs. The modes, the default strengths and the padding are the
request rules' (``diffq.app.contract.rules``), which the API checks requests by.

- Masks are white where the model repaints and black where the input is
  kept; grey is binarised at 50%, as diffusers' inpainting pipelines do.
- Outpainting is inpainting on a larger canvas: the input is placed at its
  offset, the new border is filled by repeating the input's edge pixels (a
  start that already continues the picture, which matters at strength < 1)
  and masked white.
- After decoding, the kept region is pasted back from the input, so
  unmasked pixels come back exactly as sent, not as a VAE round trip.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffq.app.contract.rules import DEFAULT_STRENGTH, JobMode, Outpaint

__all__ = ["DEFAULT_STRENGTH", "Mode", "Padding", "binary_mask", "mask_from_alpha", "outpaint_canvas", "paste_back"]


#: The engine's names for the request rules' mode enum and outpainting padding (one definition
#: each, in ``diffq.app.contract.rules``, shared with the API).
Mode = JobMode
Padding = Outpaint


def binary_mask(mask: Image.Image) -> Image.Image:
    """Mode "L" mask with only 0 (keep) and 255 (repaint); grey is cut at 50%."""
    grey = np.asarray(mask.convert("L"))
    return Image.fromarray(np.where(grey >= 128, 255, 0).astype(np.uint8), mode="L")


def mask_from_alpha(image: Image.Image) -> Image.Image:
    """For product shots: opaque pixels (the product) are kept, transparent ones repainted."""
    alpha = np.asarray(image.convert("RGBA"))[:, :, 3]
    return Image.fromarray(np.where(alpha >= 128, 0, 255).astype(np.uint8), mode="L")


def outpaint_canvas(image: Image.Image, padding: Padding) -> tuple[Image.Image, Image.Image]:
    """The enlarged canvas (border filled by edge repetition) and its mask (white border)."""
    pixels = np.asarray(image.convert("RGB"))
    pad = ((padding.top, padding.bottom), (padding.left, padding.right), (0, 0))
    canvas = Image.fromarray(np.pad(pixels, pad, mode="edge"), mode="RGB")
    mask = np.full(canvas.size[::-1], 255, dtype=np.uint8)
    mask[padding.top : padding.top + image.height, padding.left : padding.left + image.width] = 0
    return canvas, Image.fromarray(mask, mode="L")


def paste_back(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """`generated` where the mask is white, `original` where it is black (all the same size)."""
    keep = np.asarray(binary_mask(mask)) == 0
    out = np.asarray(generated.convert("RGB")).copy()
    out[keep] = np.asarray(original.convert("RGB"))[keep]
    return Image.fromarray(out, mode="RGB")
