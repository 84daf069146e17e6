"""Image editing inputs: the modes, mask handling, the outpainting canvas and paste-back.

Pure Pillow/NumPy (no torch), so the worker can prepare inputs before the pipeline runs.
The API does not import it (nothing under ``app`` imports ``model``): it keeps its own copy
of the mode names (``app.contract.records.JobMode``) and of the mask rules
(``app.core.inputs``).

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

from dataclasses import dataclass
from enum import Enum

import numpy as np
from PIL import Image

__all__ = ["Mode", "Padding", "binary_mask", "outpaint_canvas", "mask_from_alpha", "paste_back"]


class Mode(str, Enum):
    """What a job does with its input image."""

    TXT2IMG = "txt2img"  # no input image
    IMG2IMG = "img2img"  # image + strength
    INPAINT = "inpaint"  # image + mask (white = repaint)
    OUTPAINT = "outpaint"  # image + pixels to add on each side

    @property
    def takes_image(self) -> bool:
        return self is not Mode.TXT2IMG


#: Default strength per editing mode: img2img keeps the input's layout, the others repaint fully.
DEFAULT_STRENGTH = {Mode.IMG2IMG: 0.75, Mode.INPAINT: 1.0, Mode.OUTPAINT: 1.0}


@dataclass(frozen=True)
class Padding:
    """Pixels outpainting adds on each side of the input."""

    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        return width + self.left + self.right, height + self.top + self.bottom

    @property
    def is_empty(self) -> bool:
        return not (self.left or self.top or self.right or self.bottom)


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
