"""diffq.model.preview: the clean-image estimate each scheduler exposes, the fitted latent projection,
and journeys, on tiny pipelines and on the shipped shapes model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffq.model.engine import Engine, GenerationRequest
from diffq.model.preview import encode_latents
from diffq.model.training.shapes_data import COLOURS, nearest_colour
from tests.conftest import SHAPES


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "euler", "euler_a", "unipc"])
def test_schedulers_expose_their_clean_image_estimate(engine: Engine, scheduler: str) -> None:
    seen = []
    request = GenerationRequest("a red circle", steps=3, scheduler=scheduler, seed=1)
    engine.generate([request], lambda step, total, latents, denoised: seen.append(
        (latents[0].clone(), denoised[0].clone())))
    assert len(seen) == 3
    # x̂0 is not the noisy latents while noise remains (the last step of some solvers lands on x̂0).
    assert not torch.allclose(*seen[0])


def test_pndm_has_no_estimate_and_falls_back_to_the_latents(engine: Engine) -> None:
    seen = []
    engine.generate([GenerationRequest("a red circle", steps=2, scheduler="pndm")],
                    lambda step, total, latents, denoised: seen.append(torch.equal(latents[0], denoised[0])))
    assert all(seen)


@pytest.fixture(scope="module")
def shapes() -> Engine:
    torch.set_num_threads(1)
    return Engine.load(SHAPES, device="cpu", dtype="float32")


@pytest.mark.parametrize("colour", ["red", "green", "blue", "yellow"])
def test_latent_projection_shows_the_right_colour(shapes: Engine, colour: str) -> None:
    pixels = torch.tensor(COLOURS[colour], dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 64, 64) / 127.5 - 1
    [preview] = shapes.preview_images(encode_latents(shapes.pipe, pixels), (64, 64), "latent")
    assert preview.size == (64, 64)
    mean = np.asarray(preview, dtype=np.float32).reshape(-1, 3).mean(0)
    assert nearest_colour(mean) == colour  # blurry and a little off (linear), but the right colour


def test_journey_goes_from_noise_to_the_final_picture(shapes: Engine) -> None:
    request = GenerationRequest("a large yellow circle in the center, blue background", seed=3, journey=True)
    [result] = shapes.generate([request])
    [frames] = result.journeys
    assert len(frames) == 20 and all(frame.size == (64, 64) for frame in frames)
    final = np.asarray(result.images[0], np.int16)
    distances = [np.abs(np.asarray(frame, np.int16) - final).mean() for frame in frames]
    assert distances[-1] < 3 and distances[0] > distances[-1]


def test_vae_previews_are_full_size(shapes: Engine) -> None:
    latents = encode_latents(shapes.pipe, torch.zeros(1, 3, 64, 64))
    [preview] = shapes.preview_images(latents, (64, 64), "vae")
    assert isinstance(preview, Image.Image) and preview.size == (64, 64)
    with pytest.raises(ValueError, match="decoder"):
        shapes.preview_images(latents, (64, 64), "sketch")
