"""worker/png.py: PNG text metadata, and bytes that depend only on pixels and parameters."""

from __future__ import annotations

from PIL import Image

from diffq.app.contract.records import JobParams, ModelRecord
from tests.helpers import png_text
from diffq.worker.png import encode_png
from diffq.worker.png import png_text as metadata_for

PARAMS = JobParams(
    prompt="a red circle, blue background", negative_prompt="green", width=16, height=16, steps=2,
    guidance_scale=7.5, scheduler="ddim", seed=41, num_images=2,
)
MODEL = ModelRecord(
    name="shapes", pipeline_class="StableDiffusionPipeline", weights_hash="ab" * 32, device="cpu", dtype="float32",
    default_width=64, default_height=64, min_size=32, max_size=128, size_multiple=8, default_steps=20, max_steps=100,
    default_guidance_scale=7.5, default_scheduler="ddim", schedulers=["ddim"],
)


def _image() -> Image.Image:
    return Image.new("RGB", (16, 16), (30, 60, 220))


def test_text_chunks_carry_the_parameters_of_that_image() -> None:
    text = png_text(encode_png(_image(), metadata_for(PARAMS, 42, MODEL)))

    assert text["prompt"] == "a red circle, blue background"
    assert text["negative_prompt"] == "green"
    assert text["seed"] == "42"  # image 1 of the request: seed + 1
    assert (text["steps"], text["scheduler"], text["guidance_scale"]) == ("2", "ddim", "7.5")
    assert (text["width"], text["height"], text["model"], text["weights_hash"]) == ("16", "16", "shapes", "ab" * 32)
    assert text["diffq_version"]


def test_no_text_chunks_when_left_out() -> None:
    assert png_text(encode_png(_image(), None)) == {}


def test_same_pixels_and_parameters_give_the_same_bytes() -> None:
    text = metadata_for(PARAMS, 41, MODEL)
    assert encode_png(_image(), text) == encode_png(_image(), dict(text))


def test_prompts_beyond_latin_1_survive() -> None:
    params = PARAMS.model_copy(update={"prompt": "un cercle rouge ★ 赤い円"})
    assert png_text(encode_png(_image(), metadata_for(params, 41, MODEL)))["prompt"] == "un cercle rouge ★ 赤い円"
