"""diffq.model.engine's editing modes on tiny random pipelines (SD 1.x, SD 2.x v-prediction, SDXL,
and a 9-channel SD inpainting checkpoint), two steps on the CPU; diffq.model.editing's helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffq.app.contract.records import JobMode, Outpaint
from diffq.app.core.validation import DEFAULT_STRENGTH as API_DEFAULT_STRENGTH
from diffq.model.editing import DEFAULT_STRENGTH, Mode, Padding, binary_mask, mask_from_alpha, outpaint_canvas, paste_back
from diffq.model.engine import Engine, GenerationRequest, InvalidRequestError, ModelLoadError
from tests.tiny_pipelines import IMAGE_SIZE, build_sd1, build_sd1_inpaint, build_sd2_vpred, build_sdxl

S = IMAGE_SIZE  # 16


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, Engine]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("editing")
    sd1 = build_sd1(root / "sd1")
    return {
        "sd1": Engine.load(sd1),
        "sd2": Engine.load(build_sd2_vpred(root / "sd2")),
        "sdxl": Engine.load(build_sdxl(root / "sdxl")),
        "sd1+inpaint": Engine.load(sd1, inpaint_path=build_sd1_inpaint(root / "sd1-inpaint")),
    }


@pytest.fixture(params=["sd1", "sd2", "sdxl", "sd1+inpaint"])
def each_engine(request, engines) -> Engine:
    return engines[request.param]


def picture(size=(S, S)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def left_half_mask(size=(S, S)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


def edit(mode: str, **fields) -> GenerationRequest:
    return GenerationRequest(prompt="a red circle", mode=mode, steps=2, scheduler="ddim", seed=5, **fields)


# -- the modes on every model family --------------------------------------------------------------


def test_img2img_runs_strength_times_steps(each_engine):
    seen = []
    request = GenerationRequest(prompt="a red circle", mode="img2img", image=picture(), strength=0.5, steps=4,
                                scheduler="ddim")
    [result] = each_engine.generate([request], on_step=lambda step, total, latents, denoised: seen.append((step, total)))
    assert seen == [(1, 2), (2, 2)]
    assert result.images[0].size == (S, S)
    assert result.parameters["mode"] == "img2img" and result.parameters["strength"] == 0.5
    assert result.parameters["image"] == f"{S}x{S}"


def test_inpaint_keeps_unmasked_pixels_exactly(each_engine):
    image = picture()
    [result] = each_engine.generate([edit("inpaint", image=image, mask=left_half_mask(), num_images=2)])
    for out in result.images:
        kept = np.asarray(out)[:, S // 2 :]
        assert np.array_equal(kept, np.asarray(image)[:, S // 2 :])
        assert not np.array_equal(np.asarray(out)[:, : S // 2], np.asarray(image)[:, : S // 2])


def test_outpaint_adds_the_border_and_keeps_the_input(each_engine):
    image = picture((8, 16))
    [result] = each_engine.generate([edit("outpaint", image=image, outpaint=Padding(left=8))])
    out = np.asarray(result.images[0])
    assert result.images[0].size == (16, 16)
    assert np.array_equal(out[:, 8:], np.asarray(image))
    assert result.parameters["outpaint"] == {"left": 8, "top": 0, "right": 0, "bottom": 0}


def test_edits_are_reproducible_and_batch_like_alone(engines):
    engine = engines["sd1"]
    requests = [edit("inpaint", image=picture(), mask=left_half_mask()), edit("img2img", image=picture(), strength=1.0)]
    together = engine.generate(requests)
    alone = [engine.generate([request])[0] for request in requests]
    for a, b in zip(together, alone):
        assert np.abs(np.asarray(a.images[0], np.int16) - np.asarray(b.images[0], np.int16)).max() <= 2


def test_inpaint_without_a_checkpoint_reimposes_the_known_latents(engines):
    """Seen through on_step: outside the mask the latents follow the input, inside they move freely."""
    engine = engines["sd2"]
    image = picture()
    last = {}
    engine.generate([edit("inpaint", image=image, mask=left_half_mask())],
                    on_step=lambda step, total, latents, denoised: last.update(latents=latents[0].clone()))
    pipe = engine._pipeline(Mode.IMG2IMG)
    with torch.no_grad():
        expected = pipe.vae.encode(pipe.image_processor.preprocess(image)).latent_dist.mode()
    expected = expected * pipe.vae.config.scaling_factor
    half = last["latents"].shape[-1] // 2
    assert torch.allclose(last["latents"][..., half:], expected[..., half:], atol=1e-5)
    assert not torch.allclose(last["latents"][..., :half], expected[..., :half], atol=1e-2)


def test_nine_channel_checkpoint_serves_inpainting(engines):
    engine = engines["sd1+inpaint"]
    assert engine.info.inpaint_unet_channels == 9
    assert engine._pipeline(Mode.INPAINT).unet.config.in_channels == 9
    assert engine._pipeline(Mode.IMG2IMG).unet.config.in_channels == 4


def test_nine_channel_checkpoint_is_not_a_main_model(tmp_path):
    folder = build_sd1_inpaint(tmp_path / "inpaint")
    with pytest.raises(ModelLoadError, match="inpaint model"):
        Engine.load(folder)
    with pytest.raises(ModelLoadError, match="an inpainting checkpoint takes 9"):
        Engine.load(build_sd1(tmp_path / "sd1"), inpaint_path=build_sd1(tmp_path / "not-inpaint"))


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_fields, field, words",
    [
        ({"mode": "sketch"}, "mode", "accepted: txt2img, img2img, inpaint, outpaint"),
        ({"mode": "img2img"}, "image", "required by mode img2img"),
        ({"mode": "inpaint", "image": "PIC"}, "mask", "required by mode inpaint"),
        ({"mode": "outpaint", "image": "PIC"}, "outpaint", "required by mode outpaint"),
        ({"image": "PIC"}, "image", "only used by mode img2img, inpaint, outpaint"),
        ({"strength": 0.5}, "strength", "only used by"),
        ({"mode": "img2img", "image": "PIC", "mask": "MASK"}, "mask", "only used by mode inpaint"),
        ({"mode": "inpaint", "image": "PIC", "mask": Image.new("L", (8, 8))}, "mask", "8×8 but the image is 16×16"),
        ({"mode": "img2img", "image": Image.new("RGB", (20, 16))}, "image", "multiples of 8"),
        ({"mode": "img2img", "image": "PIC", "width": 24}, "width", "omit width and height"),
        ({"mode": "img2img", "image": "PIC", "strength": 0.0}, "strength", "0 < strength <= 1"),
        ({"mode": "img2img", "image": "PIC", "strength": 1.5}, "strength", "0 < strength <= 1"),
        ({"mode": "img2img", "image": "PIC", "strength": 0.1, "steps": 5}, "strength", "no denoising step"),
        ({"mode": "outpaint", "image": "PIC", "outpaint": Padding()}, "outpaint", "adds no pixels"),
        ({"mode": "outpaint", "image": "PIC", "outpaint": Padding.model_construct(left=-8)}, "outpaint.left", "accepted: 0.."),
        ({"mode": "outpaint", "image": "PIC", "outpaint": Padding(left=4)}, "outpaint", "20×16"),
        ({"mode": "img2img", "image": np.zeros((16, 16, 3))}, "image", "must be a PIL image"),
    ],
)
def test_editing_errors_name_the_field(engines, request_fields, field, words):
    replacements = {"PIC": picture(), "MASK": left_half_mask()}
    fields = {key: replacements.get(value, value) if isinstance(value, str) else value
              for key, value in request_fields.items()}
    with pytest.raises(InvalidRequestError) as caught:
        engines["sd1"].validate(GenerationRequest(prompt="a red circle", **fields))
    assert caught.value.field == field
    assert words in str(caught.value)


def test_validate_fills_in_the_edit_size_and_strength(engines):
    resolved = engines["sd1"].validate(GenerationRequest(prompt="x", mode="outpaint", image=picture((8, 16)),
                                                         outpaint=Padding(top=8, right=8)))
    assert (resolved.width, resolved.height, resolved.strength) == (16, 24, 1.0)
    assert engines["sd1"].validate(resolved) == resolved


# -- diffq.model.editing -----------------------------------------------------------------------------------


def test_the_api_and_the_model_share_one_definition_of_modes_padding_and_defaults():
    # One definition each, in the request rules (diffq.app.contract.rules), not two kept in step.
    assert Mode is JobMode and Padding is Outpaint
    assert DEFAULT_STRENGTH is API_DEFAULT_STRENGTH


def test_outpaint_canvas_repeats_the_edges_and_masks_the_border():
    image = Image.new("RGB", (4, 2), (10, 20, 30))
    image.putpixel((0, 0), (200, 0, 0))
    canvas, mask = outpaint_canvas(image, Padding(left=2, bottom=1))
    assert canvas.size == mask.size == (6, 3)
    assert canvas.getpixel((0, 0)) == (200, 0, 0)  # the edge pixel, repeated leftwards
    assert canvas.getpixel((5, 2)) == (10, 20, 30)
    assert np.array_equal(np.asarray(mask), [[255, 255, 0, 0, 0, 0], [255, 255, 0, 0, 0, 0], [255] * 6])


def test_masks_are_binarised_and_alpha_marks_what_to_keep():
    grey = Image.fromarray(np.array([[0, 127, 128, 255]], dtype=np.uint8), mode="L")
    assert np.asarray(binary_mask(grey)).tolist() == [[0, 0, 255, 255]]
    rgba = Image.new("RGBA", (2, 1), (9, 9, 9, 0))
    rgba.putpixel((1, 0), (9, 9, 9, 255))
    assert np.asarray(mask_from_alpha(rgba)).tolist() == [[255, 0]]


def test_paste_back_takes_generated_pixels_only_inside_the_mask():
    out = paste_back(Image.new("RGB", (2, 1), "white"), Image.new("RGB", (2, 1), "black"),
                     Image.fromarray(np.array([[255, 0]], dtype=np.uint8), mode="L"))
    assert np.asarray(out).tolist() == [[[255, 255, 255], [0, 0, 0]]]
