"""Smoke training: every stage of `python -m diffq.model.training.train` on the tiny preset, then a plain
diffusers pipeline call on the result. It keeps the training code working; it does not
retrain the shipped model."""

import json
import logging
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run(*args):
    subprocess.run([sys.executable, "-m", "diffq.model.training.train", *args], check=True, capture_output=True, text=True)


def test_train_all_stages_resume_and_export(tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    common = ["--preset", "tiny", "--run", str(tmp_path / "run"), "--batch", "4", "--save-every", "2"]
    run("vae", *common, "--steps", "4")
    run("decoder", *common, "--steps", "2", "--edge-weight", "8", "--peak-weight", "0.25")
    run("unet", *common, "--steps", "3")
    run("unet", *common, "--steps", "5")  # resumes from step 3
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "vae" and r["step"] == 4 for r in log)
    out = tmp_path / "model"
    run("export", *common, "--out", str(out))
    record = json.loads((out / "training.json").read_text())
    assert (record["vae_steps"], record["decoder_steps"], record["unet_steps"]) == (4, 2, 5)
    assert record["history"][-1]["decoder"]["argv"][-4:] == ["--edge-weight", "8", "--peak-weight", "0.25"]

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]
    image = pipe("a red circle", num_inference_steps=2).images[0]
    assert image.size == (64, 64)


def test_edge_weighted_loss_counts_errors_at_a_shapes_outline_more():
    import torch
    import torch.nn.functional as F

    from diffq.model.training import shapes_data
    from diffq.model.training.train import edge_map, reconstruction_loss

    images = torch.from_numpy(shapes_data.batch([0])[0])
    edges = edge_map(images)
    assert 0 < edges.mean() < 0.3  # the outline, not the flat background
    flat = edges.flatten().argmin()  # a pixel far from any edge
    outline = edges.flatten().argmax()
    errors = []
    for pixel in (flat, outline):
        recon = images.clone()
        recon.view(1, 3, -1)[0, :, pixel] += 0.5
        errors.append(reconstruction_loss(recon, images, edge_weight=8.0))
        # without the weight it is the plain L1 + MSE the shipped VAE was trained with
        assert torch.isclose(reconstruction_loss(recon, images),
                             F.l1_loss(recon, images) + F.mse_loss(recon, images))
    assert errors[1] > 5 * errors[0]


def test_lora_stage_on_inverted_latents_resumes_and_records_its_settings(tmp_path):
    """`lora` with the options the shipped `stripes` adapter was trained with (a pool of inverted
    latents, cosine learning rate), on the shipped model, two steps then a resumed third."""
    from safetensors.torch import load_file

    from diffq.model.training.train import LORA_TARGETS

    out = tmp_path / "stripes.safetensors"
    common = ["lora", "--init-from", "model/shapes", "--run", str(tmp_path / "run"), "--batch", "2",
              "--save-every", "1", "--latent-pool", "3", "--invert-steps", "1", "--targets", "attention",
              "--lr-schedule", "cosine", "--warmup", "1", "--threads", "1", "--out", str(out)]
    run(*common, "--steps", "2")
    run(*common, "--steps", "3")  # resumes; the pool is read back, not inverted again
    record = json.loads(out.with_suffix(".json").read_text())
    assert (record["steps"], record["latent_pool"], record["invert_steps"]) == (3, 3, 1)
    assert record["targets"] == LORA_TARGETS["attention"]
    names = load_file(out).keys()
    assert names and all(any(f".{t}." in n for t in LORA_TARGETS["attention"]) for n in names)
    assert not any("conv" in n for n in names)


def test_pool_order_visits_every_latent_once_per_pass():
    from diffq.model.training.train import pool_index

    first, second = ([pool_index(5, k, seed=0) for k in range(p * 5, p * 5 + 5)] for p in (0, 1))
    assert sorted(first) == sorted(second) == list(range(5))
    assert [pool_index(5, k, seed=0) for k in range(10)] == first + second  # a pure function of k


def test_inverted_latents_decode_to_the_stripes_the_encoders_lose():
    """The shipped VAE (trained on flat colours) fades drawn stripes below the detector's
    threshold for some scenes; ten steps of decoder inversion bring them all back, and the
    scorer reads every decoded scene as asked (no stray pixels taken for shapes)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from diffq.model.training import evaluate, shapes_data
    from diffq.model.training.train import invert_latents

    vae = AutoencoderKL.from_pretrained("model/shapes/vae").eval().requires_grad_(False)
    samples = [shapes_data.sample(seed) for seed in range(8)]
    images = torch.from_numpy(np.stack([np.asarray(shapes_data.render(s, style="stripes"))
                                        for _, _, s in samples]).transpose(0, 3, 1, 2)).float() / 127.5 - 1

    def decoded(z):
        with torch.no_grad():
            x = ((vae.decode(z).sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in x]

    encoded = decoded(invert_latents(vae, images, 0, "cpu"))
    inverted = decoded(invert_latents(vae, images, 10, "cpu"))
    assert sum(not shapes_data.has_stripes(im) for im in encoded) >= 2
    assert all(shapes_data.has_stripes(im) for im in inverted)
    for image, (_, _, scene) in zip(inverted, samples):
        assert all(evaluate.score(image, scene).values()), scene


def test_peak_term_makes_a_speckle_count_where_a_mean_barely_feels_it():
    import torch

    from diffq.model.training import shapes_data
    from diffq.model.training.train import reconstruction_loss

    images = torch.from_numpy(shapes_data.batch([0, 1])[0])
    blurred = images + 0.02 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    speckled = blurred.clone()
    speckled[0, :, 30:33, 30:33] = -images[0, :, 30:33, 30:33]  # nine pixels of the opposite colour
    plain = [reconstruction_loss(x, images) for x in (blurred, speckled)]
    peak = [reconstruction_loss(x, images, peak_weight=0.25) for x in (blurred, speckled)]
    assert plain[1] - plain[0] < 0.01  # the mean: a speckle is 9 of 4,096 pixels
    assert peak[1] - peak[0] > 10 * (plain[1] - plain[0])
    assert torch.isclose(reconstruction_loss(blurred, images, peak_weight=0.0), plain[0])


def test_flat_term_makes_a_blotch_or_a_soft_second_pixel_count_and_leaves_rims_to_the_rest():
    import torch
    import torch.nn.functional as F

    from diffq.model.training import shapes_data
    from diffq.model.training.train import edge_map, palette_pixels, reconstruction_loss

    images = torch.from_numpy(shapes_data.batch([0, 1])[0])
    pure = palette_pixels(images)
    assert 0.8 < pure.mean() < 1.0  # the rims are blends: everything else is a palette colour
    rims = 1 - pure
    beside = (F.max_pool2d(rims, 3, stride=1, padding=1) - rims).clamp(min=0)  # pure pixels touching a rim
    near = images + 0.05  # every pixel ~11 RGB units off: under the margin
    blotched = near.clone()
    y, x = [int(v) for v in torch.nonzero((edge_map(images)[0, 0] == 0)[20:44, 20:44])[0]]
    blotched[0, :, 20 + y, 20 + x] += 0.5  # one pixel inside a flat area ~110 units off
    softened = near + 0.5 * beside  # the pixel beside every rim as far off
    rimmed = near + 0.5 * rims  # the rims themselves as far off
    plain = [reconstruction_loss(x, images, edge_weight=8) for x in (near, blotched, softened, rimmed)]
    flat = [reconstruction_loss(x, images, edge_weight=8, flat_weight=1.0) for x in (near, blotched, softened, rimmed)]
    assert torch.isclose(flat[0], plain[0])  # nothing past the margin: no cost
    assert plain[1] - plain[0] < 1e-3  # one pixel of 4,096: the mean barely feels it
    assert flat[1] - flat[0] > 50 * (plain[1] - plain[0])
    assert flat[2] - plain[2] > 1.0  # a soft second pixel costs
    assert torch.isclose(flat[3], plain[3])  # rims are the rest of the loss's business
