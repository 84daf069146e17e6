"""Editing on the shipped "shapes" model: the edits follow the prompt and keep what they must.

Inputs are flat palette colours, so the checks read colours the way
`diffq.model.training.evaluate` does (nearest palette colour per pixel). DPM-Solver++ at the
model's default 20 steps, as the service runs it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffq.model.engine import Engine, GenerationRequest, Padding
from diffq.model.training.shapes_data import COLOURS, _palette_labels
from tests.conftest import SHAPES


@pytest.fixture(scope="module")
def shapes() -> Engine:
    torch.set_num_threads(1)
    return Engine.load(SHAPES, device="cpu", dtype="float32")


def share_of(image: Image.Image, box: tuple[int, int, int, int], colour: str) -> float:
    """Share of the pixels in `box` whose nearest palette colour is `colour`."""
    labels = _palette_labels(np.asarray(image.crop(box)))
    return float((labels == list(COLOURS).index(colour)).mean())


def flat(colour: str, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, COLOURS[colour])


def test_inpainting_paints_the_prompt_into_the_mask_and_keeps_the_rest(shapes):
    source = flat("yellow")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    request = GenerationRequest(prompt="a large blue square in the center, yellow background", mode="inpaint",
                                image=source, mask=mask, seed=1)
    [result] = shapes.generate([request])
    out = result.images[0]

    assert share_of(out, (16, 16, 48, 48), "blue") >= 0.35  # measured 0.52-0.54 over seeds 0-5
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(out)[outside], np.asarray(source)[outside])


def test_outpainting_continues_the_background_and_keeps_the_original(shapes):
    source = flat("red", (32, 64))
    request = GenerationRequest(prompt="red background", mode="outpaint", image=source,
                                outpaint=Padding(left=16, right=16), seed=1)
    [result] = shapes.generate([request])
    out = result.images[0]

    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out)[:, 16:48], np.asarray(source))
    for border in ((0, 0, 16, 64), (48, 0, 64, 64)):
        assert share_of(out, border, "red") >= 0.9  # measured 1.0 over seeds 0-5


def test_img2img_stays_close_at_low_strength_and_follows_the_prompt_at_strength_one(shapes):
    source = flat("yellow")
    prompt = "a large white circle in the center, green background"
    low, full = shapes.generate([
        GenerationRequest(prompt=prompt, mode="img2img", image=source, strength=0.3, seed=2),
        GenerationRequest(prompt=prompt, mode="img2img", image=source, strength=1.0, seed=2),
    ])

    difference = np.abs(np.asarray(low.images[0], np.int16) - np.asarray(source, np.int16)).mean()
    assert difference <= 30 and share_of(low.images[0], (0, 0, 64, 64), "yellow") >= 0.8  # measured 12-16, 0.92+
    assert share_of(full.images[0], (0, 0, 64, 64), "green") >= 0.6  # measured 0.85
