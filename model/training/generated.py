"""Decoder training pairs from the generator itself: what the UNet makes, and what it should look like.

The decoder was trained on the encoder's latents of rendered scenes, and it reconstructs them
crisply (docs/model.md); the UNet's latents lie a little off those, and the decoder turns the
difference into the pillows, soft corners and speckles the 20-step images show. This module
samples latents the way the service does (the model's pipeline, DPM-Solver++ 20 steps,
guidance 5, full captions of scenes the training seeds draw) and pairs each with the scene
rendered ideally where the generator put each shape: the scene's colours and kinds at the
scene's sizes, each shape centred on the centroid of what the current decoder draws for it.
A sample whose decoding does not read back as its scene (wrong colour, kind or position, a
shape missing) is left out: the decoder learns to sharpen what the UNet drew, never to draw
something else. `python -m diffq.model.training.train decoder --pool runs/pool.pt` mixes these
pairs with reconstructions (`--pool-share`).

`python -m diffq.model.training.generated --model model/shapes -n 2000 --out runs/pool.pt`.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffq.model.training import fidelity, shapes_data
from diffq.model.training.shapes_data import render_at

POOL_SEED_BASE = 30_000_000  # above training.train's TRAIN_SEED_BASE (evaluation's seeds are below it)
ALL_MENTIONS = frozenset({"background", "position", "size"})


def full_scene(seed: int) -> shapes_data.Scene:
    """Training scene number `seed` with every attribute in its caption, so it has one rendering."""
    scene = shapes_data.random_scene(random.Random(seed))
    return shapes_data.Scene(scene.background, scene.shapes, ALL_MENTIONS)


def aligned_truth(image: Image.Image, scene: shapes_data.Scene, style: str = "plain") -> Image.Image | None:
    """The ideal rendering of `scene` (in `style`) with each shape where `image` drew it, or None when
    `image` does not read back as `scene` (background, or any shape's colour, kind or position; with
    stripes asked, a background without them)."""
    if style == "stripes" and not shapes_data.has_stripes(image):
        return None
    found = shapes_data.analyse(image, scene)
    if found.background != scene.background:
        return None
    pixels = np.asarray(image.convert("RGB"))
    centres = []
    for shape, got in zip(scene.shapes, found.shapes, strict=True):
        if (got["colour"], got["kind"], got["position"]) != (shape.colour, shape.kind, shape.position):
            return None
        mask = fidelity.shape_pixels(pixels, shape.colour)
        if len(scene.shapes) > 1:
            mask &= shapes_data.half_region(shape.position)
        region = fidelity.largest_region(mask)
        if region.sum() < 6:
            return None
        gx, gy = fidelity.centroid(region)
        ox, oy = fidelity.centroid_offset(shape.kind, shape.size)
        centres.append((gx - ox, gy - oy))
    return render_at(scene, centres, style)


@torch.no_grad()
def build_pool(
    model: Path,
    n: int,
    seed: int,
    steps: int,
    guidance: float,
    scheduler: str,
    batch: int,
    device: str,
    lora: Path | None = None,
    style: str = "plain",
) -> dict:
    """`n` candidate samples of `model` (with the LoRA adapter file `lora` at weight 1, whose style
    the truths are drawn in); returns the kept ones: {"latents" (K, C, h, w) unscaled, "truths"
    (K, 3, 64, 64) uint8, "captions", "seeds", and how many were tried}."""
    from diffusers import StableDiffusionPipeline

    from diffq.model.schedulers import build_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.to(device)
    factor = pipe.vae.config.scaling_factor
    latents, truths, captions, seeds = [], [], [], []
    started = time.time()
    for start in range(0, n, batch):
        chunk = [POOL_SEED_BASE + seed * 1_000_003 + i for i in range(start, min(n, start + batch))]
        scenes = [full_scene(s) for s in chunk]
        out = pipe(
            [sc.caption for sc in scenes],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(s) for s in chunk],
            output_type="latent",
        ).images
        raw = out / factor
        decoded = pipe.vae.decode(raw).sample.clamp(-1, 1)
        arrays = ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for k, scene in enumerate(scenes):
            truth = aligned_truth(Image.fromarray(arrays[k]), scene, style)
            if truth is None:
                continue
            latents.append(raw[k].cpu())
            truths.append(torch.from_numpy(np.asarray(truth).transpose(2, 0, 1).copy()))
            captions.append(scene.caption)
            seeds.append(chunk[k])
        print(f"{start + len(chunk)}/{n} tried, {len(latents)} kept, {time.time() - started:.0f} s", flush=True)
    return {
        "latents": torch.stack(latents),
        "truths": torch.stack(truths),
        "captions": captions,
        "seeds": seeds,
        "tried": n,
        "model": str(model),
        "steps": steps,
        "guidance": guidance,
        "scheduler": scheduler,
        "lora": str(lora) if lora else None,
        "style": style,
        "seconds": time.time() - started,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m diffq.model.training.generated", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", type=Path, default=Path(__file__).parent.parent / "shapes")
    parser.add_argument("-n", type=int, default=2000, help="samples to try")
    parser.add_argument("--out", type=Path, required=True, help="the pool file (.pt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scheduler", default="dpmpp_2m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lora", type=Path, default=None, help="a LoRA adapter file to sample with, at weight 1")
    parser.add_argument(
        "--style", default="plain", choices=shapes_data.STYLES, help="the style the truths are drawn in"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pool = build_pool(
        args.model,
        args.n,
        args.seed,
        args.steps,
        args.guidance,
        args.scheduler,
        args.batch,
        args.device,
        args.lora,
        args.style,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pool, args.out)
    print(f"kept {len(pool['seeds'])} of {pool['tried']} in {pool['seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
