"""An invisible watermark in the pixels, so a label survives what strips metadata.

Uses ``invisible-watermark`` (the library Stability's SDXL reference code uses) with its
``dwtDctSvd`` method: measured here on a 512×512 image, the payload came back whole from the
original, after JPEG quality 80, and after a 0.5× resize once the image is scaled back to its
size (``dwtDct``, SDXL's choice, lost 60% of the bits to JPEG 80). The method needs at least
256×256 pixels; smaller images are left unmarked, and the job says so in a warning.

The library imports torch, so it is imported only when a function here is called: in the worker
(marking) and in ``diffq verify``, never in the API process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    import numpy as np

METHOD = "dwtDctSvd"
MIN_SIDE = 256  # the library asserts width × height ≥ 256 × 256; a side below 256 also fails its DWT


def available() -> bool:
    """Whether the library is installed (the worker extra), without importing it."""
    import importlib.util

    return importlib.util.find_spec("imwatermark") is not None


def fits(width: int, height: int) -> bool:
    return min(width, height) >= MIN_SIDE


def embed(image: Image.Image, payload: bytes) -> Image.Image:
    """``image`` with ``payload`` hidden in its pixels (RGB in, RGB out)."""
    from imwatermark import WatermarkEncoder

    bgr = _bgr(image)

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", payload)
    marked = encoder.encode(bgr, METHOD)
    return Image.fromarray(marked[:, :, ::-1].copy())


def decode(image: Image.Image, length: int) -> bytes:
    """The ``length`` bytes hidden in ``image`` (noise if it holds none)."""
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bytes", length * 8)
    return bytes(decoder.decode(_bgr(image), METHOD))


def _bgr(image: Image.Image) -> np.ndarray:
    """OpenCV's channel order, as the library expects."""
    import numpy as np

    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def bit_accuracy(found: bytes, expected: bytes) -> float:
    """Share of the payload's bits that ``found`` has right."""
    import numpy as np

    a = np.unpackbits(np.frombuffer(expected, np.uint8))
    b = np.unpackbits(np.frombuffer(found.ljust(len(expected), b"\0")[: len(expected)], np.uint8))
    return float((a == b).mean())


def read(image: Image.Image, expected: bytes) -> dict[str, Any]:
    """Look for ``expected`` in ``image``: as it is, and scaled up 2× (a copy resized to half)."""
    if not available():
        return {"checked": False, "reason": "invisible-watermark is not installed here (diffq's worker extra)"}
    best = 0.0
    for scale in (1, 2):
        candidate = image if scale == 1 else image.resize((image.width * 2, image.height * 2), Image.Resampling.BICUBIC)
        if not fits(*candidate.size):
            continue
        accuracy = bit_accuracy(decode(candidate, len(expected)), expected)
        best = max(best, accuracy)
        if accuracy == 1.0:
            break
    return {
        "checked": True,
        "found": best >= 0.9,
        "bit_accuracy": round(best, 4),
        "payload": expected.decode("utf-8", "replace") if best >= 0.9 else None,
    }
