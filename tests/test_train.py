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
    run("decoder", *common, "--steps", "3", "--pool", str(tiny_pool(tmp_path / "pool.pt")))  # resumes, with a pool
    run("unet", *common, "--steps", "3")
    run("unet", *common, "--steps", "5")  # resumes from step 3
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "vae" and r["step"] == 4 for r in log)
    out = tmp_path / "model"
    run("export", *common, "--out", str(out))
    record = json.loads((out / "training.json").read_text())
    assert (record["vae_steps"], record["decoder_steps"], record["unet_steps"]) == (4, 3, 5)
    assert record["history"][-1]["decoder"]["argv"][-2:] == ["--pool", str(tmp_path / "pool.pt")]

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

    # lcm: the exported tiny model distilled into a 4-step student, two steps then a resumed third
    student = tmp_path / "model-lcm"
    lcm = ["lcm", "--init-from", str(out), "--run", str(tmp_path / "lcm"), "--batch", "4", "--save-every", "1",
           "--ode-steps", "25", "--threads", "1", "--out", str(student)]
    run(*lcm, "--steps", "2")
    run(*lcm, "--steps", "3")
    assert_lcm_folder(student, steps=3, ode_steps=25)


def tiny_pool(path):
    """A pool file as `diffq.model.training.generated` writes one, for the tiny preset's latents."""
    import torch

    from diffq.model.training import shapes_data
    from diffq.model.training.architecture import PRESETS

    arch = PRESETS["tiny"]
    side = 64 // 2 ** (len(arch.vae_channels) - 1)
    images, captions = shapes_data.batch(range(3), as_uint8=True)
    torch.save({"latents": torch.randn(3, arch.latent_channels, side, side), "truths": torch.from_numpy(images),
                "captions": captions, "seeds": [0, 1, 2], "tried": 3}, path)
    return path


def test_aligned_truth_is_the_ideal_scene_where_the_generator_drew_it_or_nothing_when_it_drew_another():
    import numpy as np
    from PIL import ImageFilter

    from diffq.model.training import fidelity, generated, shapes_data

    all_ = generated.ALL_MENTIONS
    scene = shapes_data.Scene("blue", (shapes_data.Shape("yellow", "square", "left", "large"),), all_)
    ideal = generated.render_at(scene, [shapes_data.POSITION_CENTRES["left"]])
    assert np.array_equal(np.asarray(ideal), np.asarray(shapes_data.render(scene)))
    # a soft square drawn 3 px right of its place: the truth is a crisp one, 3 px right
    moved = generated.render_at(scene, [(20.0, 32.0)])
    soft = moved.filter(ImageFilter.GaussianBlur(1.5))
    assert fidelity.measure(soft, scene.shapes[0]).speckle > 0.1  # a soft inside, off its colour
    truth = generated.aligned_truth(soft, scene)
    assert truth is not None
    assert fidelity.measure(truth, scene.shapes[0]).speckle == 0
    assert np.abs(np.asarray(truth, np.int16) - np.asarray(moved, np.int16)).max() <= 2
    # two shapes: each centred where its half has it
    pair = shapes_data.Scene("black", (shapes_data.Shape("red", "circle", "left", "small"),
                                       shapes_data.Shape("green", "star", "right", "large")), all_)
    drawn = generated.render_at(pair, [(18.0, 31.0), (49.0, 33.5)])
    offset = np.abs(np.asarray(generated.aligned_truth(drawn, pair), np.int16) - np.asarray(drawn, np.int16))
    assert offset.mean() < 1.0 and np.percentile(offset, 99) < 40  # within a fraction of a pixel
    # what does not read back as the scene gives no pair: another colour, another kind, a shape missing
    for other in (
        shapes_data.Scene("blue", (shapes_data.Shape("red", "square", "left", "large"),), all_),
        shapes_data.Scene("blue", (shapes_data.Shape("yellow", "circle", "left", "large"),), all_),
        shapes_data.Scene("blue", (shapes_data.Shape("yellow", "square", "right", "large"),), all_),
    ):
        assert generated.aligned_truth(moved, other) is None
    assert generated.aligned_truth(generated.render_at(pair, [(18.0, 31.0), (-40.0, -40.0)]), pair) is None


def assert_lcm_folder(folder, steps, ode_steps):
    """A 4-step model that plain diffusers and the service load: an LCMScheduler on the teacher's
    noise schedule, a guidance-conditioned UNet, the record of its distillation."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from diffq.model.engine import Engine, GenerationRequest

    settings = json.loads((folder / "diffq.json").read_text())
    assert (settings["lcm"], settings["default_steps"], settings["default_scheduler"]) == (True, 4, "lcm")
    record = json.loads((folder / "training.json").read_text())
    assert record["lcm_steps"] == steps and record["history"][-1]["argv"][0] == "lcm"
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == ode_steps
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    assert pipe.unet.config.time_cond_proj_dim is not None
    image = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64) and len(pipe.scheduler.timesteps) == 4
    assert not pipe.do_classifier_free_guidance  # guidance is the UNet's input: one UNet call per step
    engine = Engine.load(folder)
    assert (engine.info.default_scheduler, engine.info.default_steps) == ("lcm", 4)
    assert engine.info.scheduler_max_steps["lcm"] == ode_steps
    [result] = engine.generate([GenerationRequest(prompt="a red circle", negative_prompt="blue", seed=1)])
    assert result.images[0].size == (64, 64)
    assert result.warnings == [
        "negative prompt ignored: this model takes the guidance scale as an input of its UNet (LCM-distilled) "
        "and runs no classifier-free guidance"
    ]


def test_lcm_student_starts_as_the_teacher_and_its_solver_is_ddim_under_guidance():
    """The student is the teacher's UNet plus a zero-initialised guidance projection: at step 0 it
    predicts exactly what the teacher does without guidance, whatever the guidance scale (the
    embedding of a scale is far from zero, so this holds only because of the zero start). The
    teacher's guided ODE step is diffusers' DDIM step on the guided v-prediction, and the
    consistency scalings are LCMScheduler's."""
    import torch
    from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel

    from diffq.model.training.architecture import build_scheduler
    from diffq.model.training.train import consistency_scalings, guidance_embedding, lcm_student, teacher_step

    teacher = UNet2DConditionModel.from_pretrained("model/shapes/unet", torch_dtype=torch.float32).eval()
    student = lcm_student(teacher).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 16, 16, generator=g)
    hidden = torch.randn(3, 16, 128, generator=g)
    unconditional = torch.randn(1, 16, 128, generator=g)
    t = torch.tensor([999, 519, 79])
    scale = torch.tensor([3.0, 5.0, 7.0])
    w = guidance_embedding(scale)
    assert w.abs().sum(1).min() > 1
    with torch.no_grad():
        expected = teacher(x, t, hidden).sample
        assert torch.equal(student(x, t, hidden, timestep_cond=w).sample, expected)
        student.time_embedding.cond_proj.weight.fill_(0.01)  # what an unzeroed projection would do
        assert not torch.allclose(student(x, t, hidden, timestep_cond=w).sample, expected, atol=1e-3)

    schedule = build_scheduler()
    alphas = schedule.alphas_cumprod
    ddim = DDIMScheduler.from_config(schedule.config)
    ddim.set_timesteps(25)
    with torch.no_grad():
        ours = teacher_step(teacher, x, t, t - 40, hidden, unconditional, scale, alphas)
        for i in range(3):
            cond = teacher(x[i : i + 1], t[i], hidden[i : i + 1]).sample
            uncond = teacher(x[i : i + 1], t[i], unconditional).sample
            guided = uncond + scale[i] * (cond - uncond)
            theirs = ddim.step(guided, int(t[i]), x[i : i + 1]).prev_sample
            torch.testing.assert_close(ours[i : i + 1], theirs, rtol=1e-4, atol=1e-4)

    lcm = LCMScheduler.from_config(schedule.config)
    for step in (0, 39, 999):
        c_skip, c_out = consistency_scalings(torch.tensor([step]))
        expected_skip, expected_out = lcm.get_scalings_for_boundary_condition_discrete(step)
        assert abs(c_skip.item() - expected_skip) < 1e-6 and abs(c_out.item() - expected_out) < 1e-6


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
    threshold for some scenes; twenty steps of decoder inversion bring them all back, and the
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
    inverted = decoded(invert_latents(vae, images, 20, "cpu"))
    # The decoder shipped since stop 33 (trained on the generator's own latents, plain backgrounds but for
    # the adapter's samples) fades stripes from the encoder's latents of most of these (2 of 8 stay
    # striped); inversion brings every one back, each stronger than the encoder's latents give it.
    assert not all(shapes_data.has_stripes(im) for im in encoded)
    assert all(shapes_data.has_stripes(im) for im in inverted)
    assert all(shapes_data.stripe_strength(i) > shapes_data.stripe_strength(e) for i, e in zip(inverted, encoded))
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


def test_the_flat_term_leaves_striped_truths_to_the_rest_of_the_loss_and_holds_the_plain_ones():
    # The flat term taught the decoder to erase stripes: a band drawn a pixel off the truth's cost
    # its whole width in flat pixels, a flat background only the band's own (small) blend error.
    import torch

    from diffq.model.training import shapes_data
    from diffq.model.training.train import flat_pixels, reconstruction_loss

    images = torch.from_numpy(shapes_data.batch([0, 1], style="stripes")[0])
    erased = torch.from_numpy(shapes_data.batch([0, 1])[0])  # the same scenes with no bands
    shapes = (erased != erased[:, :, :1, :1]).any(1, keepdim=True)  # not the plain background's colour
    shifted = torch.where(shapes, images, torch.roll(images, shifts=1, dims=3))  # every band a pixel right
    striped = torch.tensor([True, True])

    def loss(recon, marks):
        return reconstruction_loss(recon, images, edge_weight=8, flat_weight=4.0, striped=marks)

    assert loss(shifted, None) > loss(erased, None)  # held pixel by pixel, erasing was the cheaper answer
    assert loss(shifted, striped) < loss(erased, striped)  # left to the edge and L1/MSE terms, drawing them is
    assert flat_pixels(images, striped).sum() == 0
    mixed = torch.cat([images[:1], erased[1:]])  # a striped and a plain truth in one batch
    assert torch.equal(flat_pixels(mixed, torch.tensor([True, False]))[1], flat_pixels(erased)[1])
    blotched = erased.clone()
    blotched[1, :, 31:34, 16:19] += 0.6  # inside the plain scene's circle (centred at 17, 32): a speckle
    assert reconstruction_loss(blotched, erased, flat_weight=4.0, striped=torch.tensor([True, False])) > 1.0


def test_the_sample_sheet_puts_each_prompt_through_both_bundled_models_side_by_side(tmp_path):
    from PIL import Image

    from diffq.model.training import samples

    out = tmp_path / "samples.png"
    samples.main(["-n", "2", "--out", str(out)])
    sheet = Image.open(out)
    assert sheet.size == (4 * 200, 1 * 236)  # one row: prompt 0 (20 steps, 4 steps), prompt 1 (20 steps, 4 steps)
    cells = [sheet.crop((x * 200 + 4, 4, x * 200 + 196, 196)) for x in range(4)]
    assert cells[0].tobytes() != cells[1].tobytes()  # two models, not one image twice
    assert cells[0].tobytes() != cells[2].tobytes()
