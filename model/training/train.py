"""Train the default "shapes" model from scratch: `python -m diffq.model.training.train {vae,unet,export} …`.

Stages, each seeded and resumable (a checkpoint in the run folder every few hundred steps,
picked up again by running the same command):

1. `vae`: an AutoencoderKL on rendered scenes (L1 + MSE reconstruction, a small KL term).
   Its latent scale is measured at the end so latents enter diffusion at unit variance.
   `decoder` fine-tunes the decoder alone later; the latent space does not move.
2. `unet`: a CLIP text encoder and a UNet2DConditionModel trained together on frozen VAE
   latents with v-prediction on a zero-terminal-SNR schedule, classifier-free-guidance
   dropout, and an exponential moving average of the weights.
3. `export`: writes the diffusers folder (EMA weights) that the service loads.
4. `lora`: a LoRA adapter (peft, on the UNet's attention and convolutions, or `--targets
   attention`) that teaches an exported model a style it never draws (`--style stripes`), the
   text encoder and the base weights frozen; written as a diffusers LoRA `.safetensors` file
   (`--out`). `--latent-pool N` trains on N scenes whose latents were inverted through the
   frozen decoder (the encoder's latents of a striped scene decode faded), `--lr-schedule
   cosine` decays the learning rate to 10% at `--steps`.

Data is procedural: step s uses scenes with seeds from a range no evaluation uses, so a
run is reproducible from its seed and the data never repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from diffq.model.training import shapes_data
from diffq.model.training.architecture import PRESETS, build_scheduler, build_text_encoder, build_unet, build_vae
from diffq.model.training.tokenizer import MAX_LENGTH, build_tokenizer

TRAIN_SEED_BASE = 10_000_000  # evaluation uses seeds below this; training never does
CFG_DROPOUT = 0.1  # share of captions replaced by "" so the model also learns the unconditional score


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def scene_batch(stage: int, step: int, batch: int, seed: int, style: str = "plain") -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] and captions for one step: seeds are a pure function of (stage, step)."""
    start = TRAIN_SEED_BASE + seed * 1_000_003 + stage * 500_000_000 + step * batch
    images, captions = shapes_data.batch(range(start, start + batch), style=style)
    return torch.from_numpy(images), captions


class Checkpoints:
    """`<run>/<stage>.pt` holding model, optimizer and EMA state and the step reached."""

    def __init__(self, run: Path, stage: str):
        self.path = run / f"{stage}.pt"
        run.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=False)

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)  # atomic: a kill mid-save never leaves a torn checkpoint


def log_line(run: Path, record: dict) -> None:
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------
# Stage 1: the autoencoder


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def edge_map(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in {0, 1}: pixels within one pixel of a colour change in the true image."""
    change = (images - F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)).abs()
    return (F.max_pool2d(change.amax(1, keepdim=True), 3, stride=1, padding=1) > 0.02).float()


def palette_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in {0, 1}: pixels whose colour is one of the palette's (not an antialiased blend)."""
    palette = torch.tensor(list(shapes_data.COLOURS.values()), dtype=images.dtype, device=images.device)
    rgb = (images + 1) * 127.5
    distance = (rgb[:, None] - palette[None, :, :, None, None]).abs().amax(2)  # (N, colours, H, W)
    return (distance.amin(1, keepdim=True) < 1.0).to(images.dtype)


def flat_pixels(images: torch.Tensor, striped: torch.Tensor | None = None) -> torch.Tensor:
    """The pixels the flat term holds to their colour: `palette_pixels`, none in the images that
    `striped` (N bools) marks. The term is a sum over pixels, far larger than the rest of the loss:
    held pixel by pixel, a band drawn a little off costs much and no band at all little, and even
    held to its shapes only, a striped image's flat term outweighs its bands' share of the loss: the
    flat term taught the decoder to erase stripes (docs/models.md). Striped images keep the edge and
    peak terms; the plain ones in the same batch keep the flat term."""
    flat = palette_pixels(images)
    if striped is None:
        return flat
    return flat * (~striped.to(images.device))[:, None, None, None].to(images.dtype)


PEAK_SHARE = 0.01  # the share of each image's pixels the peak term averages over (its worst)
#: The flat term's margin: a pixel of a flat area this far from its true colour (Euclidean, RGB
#: units) starts to cost. Half the evaluation's speckle distance (fidelity.SPECKLE_DISTANCE, 48).
FLAT_MARGIN = 24.0


def reconstruction_loss(
    recon: torch.Tensor,
    images: torch.Tensor,
    edge_weight: float = 0.0,
    peak_weight: float = 0.0,
    flat_weight: float = 0.0,
    striped: torch.Tensor | None = None,
) -> torch.Tensor:
    """L1 + MSE per pixel, with pixels near edges counting (1 + edge_weight) times: a small
    star's points are a few dozen pixels of a 4,096-pixel image, and an unweighted loss
    rounds them off (the scorer then reads the star as a circle or a square).

    `peak_weight` adds that weight times the mean error of each image's worst PEAK_SHARE of
    pixels: a speckle inside a shape is ten wrong pixels of 4,096, which a mean barely feels,
    but it is most of an image's worst 1%.

    `flat_weight` adds that weight times each image's sum, over the pixels whose true colour is
    a palette colour (every pixel but the antialiased rims), of (distance to the true colour -
    FLAT_MARGIN)², distances in RGB units / 127.5 (a sum, not a mean: five pixels 60 units off
    cost about 0.4, the size of the rest of the loss). The evaluation's speckle is pixels more
    than 48 units off inside a shape, rim left out: blotches 50-70 units off inside flat areas
    and a second soft pixel beside the rim. Neither is ever among an image's worst 1% (the rims
    are), so the peak term does not reach them; this one costs nothing until such a pixel
    drifts past the margin. `striped` (N bools): the images whose background is striped, which
    have no flat term (`flat_pixels`)."""
    per_pixel = (recon - images).abs() + (recon - images) ** 2
    if not edge_weight:
        loss = per_pixel.mean()
    else:
        weight = 1.0 + edge_weight * edge_map(images)
        loss = (per_pixel * weight).mean() / weight.mean()
    if peak_weight:
        errors = per_pixel.mean(1).flatten(1)  # (N, H*W): each pixel's error over its channels
        worst = errors.topk(max(1, round(PEAK_SHARE * errors.shape[1])), dim=1).values
        loss = loss + peak_weight * worst.mean()
    if flat_weight:
        flat = flat_pixels(images, striped)
        distance = (recon - images).norm(dim=1, keepdim=True)
        excess = F.relu(distance - FLAT_MARGIN / 127.5) ** 2
        loss = loss + flat_weight * (excess * flat).sum() / images.shape[0]
    return loss


def train_vae(args: argparse.Namespace) -> None:
    arch = PRESETS[args.preset]
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    vae = build_vae(arch).to(device)
    ckpt = Checkpoints(args.run, "vae")
    autoencoder_loop(vae, list(vae.parameters()), ckpt, 0, args, device)
    scale = measure_latent_scale(vae, device)
    state = ckpt.load()
    assert state is not None, "autoencoder_loop saved a checkpoint"
    state.update(scale)
    ckpt.save(state)
    print(f"vae done: latent mean {scale['latent_mean']:.3f}, std {scale['latent_std']:.3f}")


def train_decoder(args: argparse.Namespace) -> None:
    """Fine-tune the VAE's decoder alone (as SD's ft-MSE VAE did): the encoder, hence the
    latent space the UNet was trained on, stays fixed, so this may run at any time."""
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    vae = load_vae(args, device).requires_grad_(False).train()
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in trainable:
        p.requires_grad_(True)
    autoencoder_loop(vae, trainable, Checkpoints(args.run, "decoder"), 2, args, device)


def autoencoder_loop(
    vae, params: list, ckpt: Checkpoints, stage: int, args: argparse.Namespace, device: torch.device
) -> None:
    """Reconstruction training of `params` (all of the VAE, or its decoder), resumable."""
    name = ckpt.path.stem
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    step, previous_seconds = 0, 0.0
    if (state := ckpt.load()) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        previous_seconds = state.get("seconds", 0.0)
        print(f"resumed {name} at step {step}")
    val_images = torch.from_numpy(shapes_data.batch(range(64))[0]).to(device)
    pool = load_pool(args, device) if stage == 2 else None
    fresh = args.batch - (pool.per_step if pool is not None else 0)  # reconstructions a step
    started = time.time()
    bar = tqdm(total=args.steps, initial=step, desc=name, dynamic_ncols=True)
    while step < args.steps:
        images, _ = scene_batch(stage, step, fresh, args.seed)
        images = images.to(device)
        with torch.set_grad_enabled(stage == 0):
            posterior = vae.encode(images).latent_dist
        # Decode the posterior mean: with sampled latents a small VAE spends thousands of steps
        # learning to outshout the posterior noise before edges get sharp. The KL term still
        # keeps the latents' scale tame, and the UNet stage encodes with the mean as well.
        recon = vae.decode(posterior.mode()).sample
        if pool is not None:  # and the generator's latents, each to its aligned ideal scene
            picks = [pool_index(len(pool.latents), step * pool.per_step + j, args.seed) for j in range(pool.per_step)]
            recon = torch.cat([recon, vae.decode(pool.latents[picks]).sample])
            images = torch.cat([images, pool.truths[picks]])
            striped = torch.cat([torch.zeros(fresh, dtype=torch.bool), pool.striped[picks]])
        else:
            striped = None
        # L1 keeps edges sharp on flat colours; MSE drives PSNR
        loss = reconstruction_loss(recon, images, args.edge_weight, args.peak_weight, args.flat_weight, striped)
        if stage == 0:
            loss = loss + args.kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:  # cosine decay to 10% over the planned steps
            group["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0 or step == args.steps:
            with torch.no_grad():
                val = psnr(vae(val_images, sample_posterior=False).sample, val_images)
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{val:.2f}")
            log_line(
                args.run,
                {"stage": name, "step": step, "loss": loss.item(), "psnr": val, "elapsed_s": time.time() - started},
            )
        if step % args.save_every == 0 or step == args.steps:
            ckpt.save(
                {
                    "model": vae.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "preset": args.preset,
                    "device": str(device),
                    "argv": sys.argv[1:],
                    "seconds": previous_seconds + time.time() - started,
                }
            )
    bar.close()


class Pool(NamedTuple):
    """`--pool`'s generated latents (unscaled), their aligned truths in [-1, 1], and how many of them
    join each step's batch (`--pool-share` of `--batch`, beside that many fewer reconstructions)."""

    latents: torch.Tensor
    truths: torch.Tensor
    per_step: int
    striped: torch.Tensor  # (N,) bools: the truths with a striped background (`flat_pixels`)


def load_pool(args: argparse.Namespace, device: torch.device) -> Pool | None:
    if args.pool is None:
        return None
    pool = torch.load(args.pool)
    per_step = round(args.batch * args.pool_share)
    truths = pool["truths"].float() / 127.5 - 1.0
    striped = torch.tensor(
        [shapes_data.has_stripes(Image.fromarray(truth.permute(1, 2, 0).numpy())) for truth in pool["truths"]],
        dtype=torch.bool,
    )
    print(
        f"pool {args.pool}: {len(truths)} generated latents ({int(striped.sum())} striped), "
        f"{per_step} of each batch of {args.batch}"
    )
    return Pool(pool["latents"].to(device), truths.to(device), per_step, striped)


@torch.no_grad()
def measure_latent_scale(vae, device, n: int = 1024) -> dict:
    """SD's `scaling_factor`: 1 / std of the latents, so diffusion sees unit variance."""
    images = torch.from_numpy(shapes_data.batch(range(TRAIN_SEED_BASE - n, TRAIN_SEED_BASE))[0])
    latents = torch.cat([vae.encode(chunk.to(device)).latent_dist.mode() for chunk in images.split(128)])
    return {
        "latent_mean": latents.mean().item(),
        "latent_std": latents.std().item(),
        "scaling_factor": 1.0 / latents.std().item(),
    }


def load_vae(args: argparse.Namespace, device: torch.device):
    """The frozen VAE: from this run's checkpoint, else from the folder a new sitting starts from."""
    arch = PRESETS[args.preset]
    vae = build_vae(arch)
    state = Checkpoints(args.run, "vae").load()
    if state is not None:
        vae.load_state_dict(state["model"])
        vae.register_to_config(scaling_factor=state["scaling_factor"])
    elif args.init_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.init_from / "vae")
    else:
        raise SystemExit(
            f"no VAE checkpoint in {args.run}: run `python -m diffq.model.training.train vae` first, "
            "or pass --init-from model/shapes to continue from the shipped model"
        )
    return vae.to(device).eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------
# Stage 2: text encoder and UNet


def sample_timesteps(batch: int, high_share: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, plus a share drawn from the noisiest 30%: that is where layout
    (which colour, which shape, where) is decided, and where a small model learns slowest."""
    t = torch.randint(0, 1000, (batch,), generator=generator)
    high = torch.rand(batch, generator=generator) < high_share
    t[high] = torch.randint(700, 1000, (int(high.sum()),), generator=generator)
    return t


def train_unet(args: argparse.Namespace) -> None:
    from diffusers.training_utils import EMAModel

    arch = PRESETS[args.preset]
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    vae = load_vae(args, device)
    latent_size = 64 // 2 ** (len(arch.vae_channels) - 1)
    text_encoder = build_text_encoder(arch, len(tokenizer)).to(device)
    unet = build_unet(arch, latent_size).to(device)
    scheduler = build_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    ckpt = Checkpoints(args.run, "unet")
    step, previous_seconds = 0, 0.0
    if (state := ckpt.load()) is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        step = state["step"]
        previous_seconds = state.get("seconds", 0.0)
        print(f"resumed unet at step {step}")
    elif args.init_from:
        # A new sitting: the shipped (EMA) weights are the start, Adam's moments start afresh,
        # and the step count (hence the data seeds) carries on where the last sitting ended.
        init_from_folder(args.init_from, unet, text_encoder)
        ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
        record = json.loads((args.init_from / "training.json").read_text())
        step, previous_seconds = record["unet_steps"], record.get("unet_seconds", 0.0)
        ema.optimization_step = 0
        print(f"initialised from {args.init_from} at step {step}")
    first_step = 0 if state is not None else step  # warm up on fresh starts and new sittings
    generator = torch.Generator().manual_seed(args.seed * 7919 + step)
    alphas = scheduler.alphas_cumprod.to(device)
    started = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="unet", dynamic_ncols=True)
    while step < args.steps:
        images, captions = scene_batch(1, step, args.batch, args.seed)
        rng = random.Random(args.seed * 1_000_003 + step)
        captions = ["" if rng.random() < CFG_DROPOUT else c for c in captions]
        ids = tokenizer(
            captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        with torch.no_grad():
            latents = vae.encode(images.to(device)).latent_dist.mode()
            latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = sample_timesteps(latents.shape[0], args.high_noise_share, generator).to(device)
        # x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε ;  v = sqrt(ᾱ_t) ε − sqrt(1-ᾱ_t) x_0  (Salimans & Ho 2022)
        a = alphas[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
        noisy = a * latents + s * noise
        target = a * noise - s * latents
        hidden = text_encoder(ids).last_hidden_state
        pred = unet(noisy, t, hidden).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:  # linear warm-up (also after a new sitting), then constant
            group["lr"] = args.lr * min(1.0, (step + 1 - first_step) / args.warmup)
        opt.step()
        ema.step(params)
        step += 1
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log_line(args.run, {"stage": "unet", "step": step, "loss": loss.item(), "elapsed_s": time.time() - started})
        if step % args.save_every == 0 or step == args.steps:
            ckpt.save(
                {
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "optimizer": opt.state_dict(),
                    "ema": ema.state_dict(),
                    "step": step,
                    "preset": args.preset,
                    "device": str(device),
                    "argv": sys.argv[1:],
                    "seconds": previous_seconds + time.time() - started,
                }
            )
    bar.close()


def init_from_folder(folder: Path, unet, text_encoder) -> None:
    """Start a new sitting from the committed (EMA) weights when no run checkpoint is at hand."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    shipped = UNet2DConditionModel.from_pretrained(folder / "unet")
    before, after = shipped.config.attention_head_dim, unet.config.attention_head_dim
    if (list(before) if isinstance(before, (list, tuple)) else before) != list(after):
        # Same weight shapes, split into other heads: attention starts over, the rest carries on.
        print(f"attention heads {before} -> {list(after)}")
    unet.load_state_dict(shipped.state_dict())
    text_encoder.load_state_dict(
        CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).state_dict()
    )


# ------------------------------------------------------------------------------------------
# Stage 4: a LoRA adapter for a style

LORA_TARGETS = {
    "all": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"],
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
}


def invert_latents(vae, images: torch.Tensor, iterations: int, device) -> torch.Tensor:
    """Latents that the frozen decoder turns into `images`: the encoder's, then `iterations` Adam
    steps on the decoder's reconstruction loss. The VAE saw only flat palette colours; it encodes
    a striped background so that it decodes faded (the stripe detector finds a quarter of the
    reconstructions plain) with off-palette pixels the scorer reads as shapes. Ten steps gave
    latents whose decodings are all striped and score like plain scenes with the decoder of stop 32
    (docs/models.md); the decoder since stop 33 fades more stripes and needs about twenty."""
    images = images.to(device)
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode()
    if not iterations:
        return z
    z = z.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(iterations):
        with torch.enable_grad():
            loss = reconstruction_loss(vae.decode(z).sample, images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    return z.detach()


def latent_pool(vae, args, device) -> tuple[torch.Tensor, list[str]]:
    """`--latent-pool` scenes of the style as inverted latents (`invert_latents`), with captions;
    computed once per run (`<run>/latents-<style>.pt`) and reused by every sitting."""
    path = args.run / f"latents-{args.style}.pt"
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=False)
        if cached["n"] == args.latent_pool and cached["iterations"] == args.invert_steps:
            return cached["latents"], cached["captions"]
    # stage 4's seeds: a range neither the other stages nor evaluation use
    images, captions = scene_batch(4, 0, args.latent_pool, args.seed, args.style)
    latents = torch.cat(
        [
            invert_latents(vae, chunk, args.invert_steps, device).cpu()
            for chunk in tqdm(images.split(32), desc="inverting latents", dynamic_ncols=True)
        ]
    )
    torch.save({"n": args.latent_pool, "iterations": args.invert_steps, "latents": latents, "captions": captions}, path)
    return latents, captions


def v_loss(
    unet,
    text_encoder,
    vae,
    tokenizer,
    images,
    captions,
    step: int,
    args,
    generator,
    alphas,
    device,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """The v-prediction loss of the UNet stage on one batch (captions dropped for guidance);
    `latents` (unscaled) instead of encoding `images`."""
    rng = random.Random(args.seed * 1_000_003 + step)
    captions = ["" if rng.random() < CFG_DROPOUT else c for c in captions]
    ids = tokenizer(
        captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    with torch.no_grad():
        if latents is None:
            latents = vae.encode(images.to(device)).latent_dist.mode()
        latents = latents.to(device) * vae.config.scaling_factor
        hidden = text_encoder(ids).last_hidden_state
    noise = torch.randn(latents.shape, generator=generator).to(device)
    t = sample_timesteps(latents.shape[0], args.high_noise_share, generator).to(device)
    a = alphas[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
    return F.mse_loss(unet(a * latents + s * noise, t, hidden).sample, a * noise - s * latents)


def train_lora(args: argparse.Namespace) -> None:
    """LoRA on a frozen exported model: only the low-rank matrices learn the style."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel

    if args.init_from is None:
        raise SystemExit("lora needs --init-from: the exported model folder the adapter is for")
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    vae = load_vae(args, device)
    text_encoder = CLIPTextModel.from_pretrained(args.init_from / "text_encoder", torch_dtype=torch.float32)
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(args.init_from / "unet", torch_dtype=torch.float32)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS[args.targets]
        )
    )
    unet.to(device).train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ckpt = Checkpoints(args.run, f"lora-{args.style}")
    step, previous_seconds = 0, 0.0
    if (state := ckpt.load()) is not None:
        unet.load_state_dict(state["unet"], strict=False)
        opt.load_state_dict(state["optimizer"])
        step, previous_seconds = state["step"], state.get("seconds", 0.0)
        print(f"resumed lora at step {step}")
    pool = latent_pool(vae, args, device) if args.latent_pool else None
    generator = torch.Generator().manual_seed(args.seed * 7919 + step)
    alphas = build_scheduler().alphas_cumprod.to(device)
    started = time.time()
    bar = tqdm(total=args.steps, initial=step, desc=f"lora {args.style}", dynamic_ncols=True)
    while step < args.steps:
        if pool is None:
            images, captions = scene_batch(3, step, args.batch, args.seed, args.style)
            latents = None
        else:  # the pool in a fresh order each pass, a pure function of (seed, step)
            picks = [pool_index(len(pool[1]), step * args.batch + j, args.seed) for j in range(args.batch)]
            images, latents, captions = None, pool[0][picks], [pool[1][i] for i in picks]
        loss = v_loss(
            unet, text_encoder, vae, tokenizer, images, captions, step, args, generator, alphas, device, latents
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
            if args.lr_schedule == "cosine":  # to 10% at --steps (a later sitting with more steps re-plans it)
                group["lr"] *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step / args.steps, 1.0)))
        opt.step()
        step += 1
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log_line(
                args.run,
                {"stage": f"lora-{args.style}", "step": step, "loss": loss.item(), "elapsed_s": time.time() - started},
            )
        if step % args.save_every == 0 or step == args.steps:
            trainable = {k: v for k, v in unet.state_dict().items() if "lora_" in k}
            ckpt.save(
                {
                    "unet": trainable,
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "device": str(device),
                    "argv": sys.argv[1:],
                    "seconds": previous_seconds + time.time() - started,
                }
            )
    bar.close()
    state = ckpt.load()
    assert state is not None, "the loop saved a checkpoint at its last step"
    save_lora(unet, args, state)


def pool_index(n: int, k: int, seed: int) -> int:
    """The k-th pick from a pool of n: pass k // n visits every entry once, in its own order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 104_729 + k // n))
    return int(order[k % n])


def save_lora(unet, args: argparse.Namespace, state: dict) -> None:
    """The adapter as diffusers writes LoRA files, and a record of how it was made beside it."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # peft's own key names (lora_A/lora_B) for every layer: diffusers' old-format conversion renames
    # only some of them, and a file with mixed names loses the others when loaded.
    layers = {k: v.to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(unet).items()}  # small
    # The LoraConfig goes into the file's metadata, so loaders target exactly the same modules.
    config = unet.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    StableDiffusionPipeline.save_lora_weights(
        out.parent, unet_lora_layers=layers, weight_name=out.name, unet_lora_adapter_metadata=config
    )
    base = json.loads((args.init_from / "diffq.json").read_text())["name"]
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                "base_model": base,
                "style": args.style,
                "rank": args.rank,
                "targets": LORA_TARGETS[args.targets],
                "latent_pool": args.latent_pool,
                "invert_steps": args.invert_steps,
                "steps": state["step"],
                "seconds": state.get("seconds", 0.0),
                "seed": args.seed,
                "device": state.get("device"),
                "argv": state.get("argv"),
                "torch": torch.__version__,
                "cpu_threads": torch.get_num_threads(),
                "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out} ({out.stat().st_size} bytes) for base model {base!r}")


# ------------------------------------------------------------------------------------------
# Stage 5: a 4-step variant by latent consistency distillation (LCM, Luo et al. 2023)

LCM_W_DIM = 256  # the guidance embedding's width (`time_cond_proj_dim`), as in LCM-distilled SD
LCM_TIMESTEP_SCALING = 10.0  # LCMScheduler's default: the consistency boundary's time scale
LCM_SIGMA_DATA = 0.5


def lcm_student(teacher):
    """The teacher's UNet with a guidance input: `time_cond_proj_dim` adds a linear projection of
    the guidance scale's embedding to the timestep embedding. It starts at zero, so until training
    moves it the student predicts exactly what the teacher does without guidance."""
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=LCM_W_DIM)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def guidance_embedding(guidance: torch.Tensor) -> torch.Tensor:
    """What diffusers' pipelines feed a w-conditioned UNet for `guidance_scale` (they embed w = scale - 1)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, guidance - 1, embedding_dim=LCM_W_DIM)


def consistency_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip and c_out of LCMScheduler: f(x, t) = c_skip x + c_out x̂0, so f(x, 0) = x."""
    scaled = (t.float() * LCM_TIMESTEP_SCALING).view(-1, 1, 1, 1)
    c_skip = LCM_SIGMA_DATA**2 / (scaled**2 + LCM_SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + LCM_SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def v_to_x0_eps(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor):
    """x̂0 and ε̂ from a v-prediction at x_t (Salimans & Ho 2022)."""
    a = alphas[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
    return a * x - s * v, s * x + a * v


def teacher_step(teacher, x, t, t_prev, hidden, unconditional, scale, alphas) -> torch.Tensor:
    """One DDIM step t → t_prev of the teacher's ODE under classifier-free guidance at `scale`
    (per sample): x_prev = sqrt(ᾱ_prev) x̂0 + sqrt(1 - ᾱ_prev) ε̂, both guided."""
    n = x.shape[0]
    v = teacher(x.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([hidden, unconditional.expand(n, -1, -1)])).sample
    x0, eps = v_to_x0_eps(v, x.repeat(2, 1, 1, 1), t.repeat(2), alphas)
    g = scale.view(-1, 1, 1, 1)
    x0 = x0[n:] + g * (x0[:n] - x0[n:])
    eps = eps[n:] + g * (eps[:n] - eps[n:])
    return alphas[t_prev].sqrt().view(-1, 1, 1, 1) * x0 + (1 - alphas[t_prev]).sqrt().view(-1, 1, 1, 1) * eps


def lcm_timesteps(batch: int, ode_steps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (t, t - k) on the `ode_steps`-point grid of the 1000-step schedule that LCMScheduler
    samples from (`original_inference_steps`): t = (i + 1) k - 1, k = 1000 // ode_steps."""
    k = 1000 // ode_steps
    start = (torch.randint(0, ode_steps, (batch,), generator=generator) + 1) * k - 1
    return start, (start - k).clamp(min=0)


def lcm_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "l2":
        return F.mse_loss(pred, target)
    c = 0.001  # pseudo-Huber (Song & Dhariwal 2023), as LCM's distillation uses
    return ((pred - target) ** 2 + c**2).sqrt().sub(c).mean()


def train_lcm(args: argparse.Namespace) -> None:
    """Latent consistency distillation of an exported model into a few-step student.

    Each step: scenes → latents (frozen VAE) → x_t at a grid timestep t; the frozen teacher with
    classifier-free guidance at a sampled scale takes one DDIM step of its ODE to x_{t-k}; the
    student's consistency output f(x_t, t, w) learns the target network's f(x_{t-k}, t-k, w),
    the target being an exponential moving average of the student."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if args.init_from is None:
        raise SystemExit("lcm needs --init-from: the exported model folder to distil (the teacher)")
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    vae = load_vae(args, device)
    text_encoder = CLIPTextModel.from_pretrained(args.init_from / "text_encoder", torch_dtype=torch.float32)
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)
    teacher = UNet2DConditionModel.from_pretrained(args.init_from / "unet", torch_dtype=torch.float32)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = lcm_student(teacher).to(device).train()
    target = lcm_student(teacher).to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt = Checkpoints(args.run, "lcm")
    step, previous_seconds = 0, 0.0
    if (state := ckpt.load()) is not None:
        student.load_state_dict(state["unet"])
        target.load_state_dict(state["target"])
        opt.load_state_dict(state["optimizer"])
        step, previous_seconds = state["step"], state.get("seconds", 0.0)
        print(f"resumed lcm at step {step}")
    generator = torch.Generator().manual_seed(args.seed * 7919 + step)
    alphas = build_scheduler().alphas_cumprod.to(device)
    empty = tokenizer([""], padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        unconditional = text_encoder(empty).last_hidden_state
    started = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="lcm", dynamic_ncols=True)
    while step < args.steps:
        images, captions = scene_batch(5, step, args.batch, args.seed)
        ids = tokenizer(
            captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        n = len(captions)
        with torch.no_grad():
            latents = vae.encode(images.to(device)).latent_dist.mode() * vae.config.scaling_factor
            hidden = text_encoder(ids).last_hidden_state
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t, t_prev = lcm_timesteps(n, args.ode_steps, generator)
        scale = args.guidance_min + (args.guidance_max - args.guidance_min) * torch.rand(n, generator=generator)
        t, t_prev, scale = t.to(device), t_prev.to(device), scale.to(device)
        w = guidance_embedding(scale).to(device)
        with torch.no_grad():
            a, s = alphas[t].sqrt().view(-1, 1, 1, 1), (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
            noisy = a * latents + s * noise
            prev = teacher_step(teacher, noisy, t, t_prev, hidden, unconditional, scale, alphas)
            c_skip, c_out = consistency_scalings(t_prev)
            x0_target = v_to_x0_eps(target(prev, t_prev, hidden, timestep_cond=w).sample, prev, t_prev, alphas)[0]
            goal = c_skip * prev + c_out * x0_target
        c_skip, c_out = consistency_scalings(t)
        x0_student = v_to_x0_eps(student(noisy, t, hidden, timestep_cond=w).sample, noisy, t, alphas)[0]
        loss = lcm_loss(c_skip * noisy + c_out * x0_student, goal, args.lcm_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        opt.step()
        with torch.no_grad():  # the target network: an exponential moving average of the student
            for p_target, p_student in zip(target.parameters(), student.parameters(), strict=True):
                p_target.lerp_(p_student, 1 - args.target_decay)
        step += 1
        bar.update(1)
        if step % 5 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log_line(args.run, {"stage": "lcm", "step": step, "loss": loss.item(), "elapsed_s": time.time() - started})
        if step % args.save_every == 0 or step == args.steps:
            ckpt.save(
                {
                    "unet": student.state_dict(),
                    "target": target.state_dict(),
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "ode_steps": args.ode_steps,  # the grid the student learnt: its scheduler's
                    "device": str(device),
                    "argv": sys.argv[1:],
                    "seconds": previous_seconds + time.time() - started,
                }
            )
    bar.close()
    state = ckpt.load()
    if state is None:
        raise SystemExit(f"no lcm checkpoint in {args.run}: --steps 0 trains nothing")
    export_lcm(args, state)


def export_lcm(args: argparse.Namespace, state: dict) -> None:
    """The student (its target network's weights) as a model folder of its own: the teacher's VAE,
    text encoder and tokenizer, an LCMScheduler on the teacher's noise schedule."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    teacher_record = json.loads((args.init_from / "training.json").read_text())
    teacher_settings = json.loads((args.init_from / "diffq.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(args.init_from, torch_dtype=torch.float32, local_files_only=True)
    student = lcm_student(pipe.unet)
    student.load_state_dict(state["target"])
    pipe.unet = student.eval()
    pipe.register_modules(unet=pipe.unet)
    ode_steps = state.get("ode_steps", args.ode_steps)
    pipe.scheduler = LCMScheduler.from_config(
        build_scheduler().config, original_inference_steps=ode_steps, timestep_scaling=LCM_TIMESTEP_SCALING
    )
    pipe.register_modules(scheduler=pipe.scheduler)
    out = Path(args.out)
    settings = {
        **teacher_settings,
        "name": f"{teacher_settings['name']}-lcm",
        "default_steps": 4,
        "default_scheduler": "lcm",
        "lcm": True,
    }
    write_folder(pipe, out, settings)
    previous = json.loads((out / "training.json").read_text()) if (out / "training.json").exists() else {}
    record = {
        "teacher": teacher_settings["name"],
        "teacher_unet_steps": teacher_record.get("unet_steps"),
        "lcm_steps": state["step"],
        "lcm_seconds": state.get("seconds", 0.0),
        "ode_steps": ode_steps,
        "seed": args.seed,
        "history": previous.get("history", [])
        + [
            {
                "lcm_steps": state["step"],
                "seconds": state.get("seconds", 0.0),
                "device": state.get("device"),
                "argv": state.get("argv"),
                "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "torch": torch.__version__,
                "cpu_threads": torch.get_num_threads(),
                "machine": platform.machine(),
            }
        ],
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"exported the {state['step']}-step LCM student to {out}")


# ------------------------------------------------------------------------------------------
# Stage 3: the diffusers folder


SHAPES_SETTINGS = {
    "name": "shapes",
    "default_width": 64,
    "default_height": 64,
    "min_size": 32,
    "max_size": 128,
    "default_steps": 20,
    "default_guidance_scale": 5.0,
    "default_scheduler": "dpmpp_2m",
    "lcm": False,
}


def write_folder(pipe, out: Path, settings: dict) -> None:
    """A pipeline as the diffusers folder the service loads, with its diffq.json."""
    pipe.save_pretrained(out, safe_serialization=True)
    # The UNet is stored in float16 to keep the repository's weights small; diffusers loads
    # it back as float32 unless asked otherwise. The text encoder stays float32: transformers
    # would otherwise load it in float16 ("auto" dtype) and mismatch the rest on a CPU.
    pipe.unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    pipe.unet.to(torch.float32)
    index = json.loads((out / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]  # loadable by transformers 4 and 5
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "diffq.json").write_text(json.dumps(settings, indent=2) + "\n")


def export(args: argparse.Namespace) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from diffusers.training_utils import EMAModel

    arch = PRESETS[args.preset]
    device = torch.device("cpu")
    vae = load_vae(args, device)
    decoder_state = Checkpoints(args.run, "decoder").load()
    if decoder_state is not None:  # same encoder, better decoder
        vae.load_state_dict(decoder_state["model"])
    tokenizer = build_tokenizer()
    latent_size = 64 // 2 ** (len(arch.vae_channels) - 1)
    text_encoder = build_text_encoder(arch, len(tokenizer))
    unet = build_unet(arch, latent_size)
    state = Checkpoints(args.run, "unet").load()
    if state is None:
        raise SystemExit(f"no UNet checkpoint in {args.run}")
    unet.load_state_dict(state["unet"])
    text_encoder.load_state_dict(state["text_encoder"])
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = EMAModel(params)
    ema.load_state_dict(state["ema"])
    ema.copy_to(params)
    # DPM-Solver++(2M) is the default sampler of a plain pipeline call; the config keeps
    # v-prediction, zero terminal SNR and trailing spacing from training.
    scheduler = DPMSolverMultistepScheduler.from_config(
        build_scheduler().config, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(args.out)
    write_folder(pipe, out, SHAPES_SETTINGS)
    vae_state = Checkpoints(args.run, "vae").load()
    previous = json.loads((args.init_from / "training.json").read_text()) if args.init_from else {}
    record = {
        "preset": args.preset,
        "architecture": dataclasses.asdict(arch),
        "seed": args.seed,
        "vae_steps": vae_state["step"] if vae_state else previous["vae_steps"],
        "vae_seconds": vae_state.get("seconds", 0.0) if vae_state else previous.get("vae_seconds", 0.0),
        # A decoder fine-tuned in a later sitting started from the shipped one, with its own step count.
        "decoder_steps": previous.get("decoder_steps", 0) + (decoder_state["step"] if decoder_state else 0),
        "decoder_seconds": previous.get("decoder_seconds", 0.0)
        + (decoder_state.get("seconds", 0.0) if decoder_state else 0.0),
        "unet_steps": state["step"],
        "unet_seconds": state.get("seconds", 0.0),
        **({"loras": previous["loras"]} if "loras" in previous else {}),  # adapters trained on this model
        "history": previous.get("history", [])
        + [
            {
                "unet_steps": state["step"],
                "device": state.get("device"),
                "argv": state.get("argv"),
                "exported_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "torch": torch.__version__,
                "cpu_threads": torch.get_num_threads(),
                "machine": platform.machine(),
                **(
                    {
                        "decoder": {
                            "steps": decoder_state["step"],
                            "seconds": decoder_state.get("seconds", 0.0),
                            "device": decoder_state.get("device"),
                            "argv": decoder_state.get("argv"),
                        }
                    }
                    if decoder_state
                    else {}
                ),
            }
        ],
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"exported to {out}: {record}")


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffq.model.training.train", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["vae", "decoder", "unet", "export", "lora", "lcm"])
    parser.add_argument("--preset", default="shapes", choices=sorted(PRESETS))
    parser.add_argument("--run", type=Path, default=Path("runs/shapes"), help="checkpoint folder")
    parser.add_argument("--steps", type=int, default=3000, help="train until this step")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl", type=float, default=1e-6, help="VAE KL weight")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--high-noise-share", type=float, default=0.3)
    parser.add_argument(
        "--edge-weight",
        type=float,
        default=0.0,
        help="vae/decoder: extra loss weight of pixels near edges (0: plain L1 + MSE)",
    )
    parser.add_argument(
        "--peak-weight",
        type=float,
        default=0.0,
        help="vae/decoder: weight of the mean error of each image's worst 1%% of pixels (speckles; 0: none)",
    )
    parser.add_argument(
        "--flat-weight",
        type=float,
        default=0.0,
        help="vae/decoder: weight of flat pixels' squared excess over 24 RGB units off their colour (0: none)",
    )
    parser.add_argument(
        "--pool",
        type=Path,
        default=None,
        help="decoder: generated latents with their aligned ideal scenes (python -m diffq.model.training.generated)",
    )
    parser.add_argument("--pool-share", type=float, default=0.5, help="decoder: share of each batch taken from --pool")
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start the UNet stage from an exported folder (a new sitting); lora, lcm: the model to adapt or distil",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="export: the model folder (model/shapes); lora: the adapter file (model/loras/<style>.safetensors); "
        "lcm: the student's model folder (model/shapes-lcm)",
    )
    parser.add_argument(
        "--style",
        default="stripes",
        choices=[s for s in shapes_data.STYLES if s != "plain"],
        help="lora: the style the adapter learns",
    )
    parser.add_argument("--rank", type=int, default=4, help="lora: rank of the low-rank matrices")
    parser.add_argument(
        "--targets",
        default="all",
        choices=sorted(LORA_TARGETS),
        help="lora: attention projections, proj_in/proj_out and resnet convolutions (all), "
        "or the attention projections alone",
    )
    parser.add_argument(
        "--lr-schedule",
        default="constant",
        choices=["constant", "cosine"],
        help="lora: after warm-up, constant or cosine decay to 10%% at --steps",
    )
    parser.add_argument(
        "--latent-pool",
        type=int,
        default=0,
        help="lora: train on this many scenes' inverted latents (0: encode fresh scenes each step)",
    )
    parser.add_argument(
        "--invert-steps",
        type=int,
        default=10,
        help="lora: decoder-inversion steps per pooled latent (0: the encoder's latents)",
    )
    parser.add_argument(
        "--ode-steps",
        type=int,
        default=50,
        help="lcm: the teacher's ODE grid (LCMScheduler's original_inference_steps); it steps t -> t - 1000/N",
    )
    parser.add_argument("--guidance-min", type=float, default=3.0, help="lcm: guidance scales sampled from min..max")
    parser.add_argument("--guidance-max", type=float, default=7.0)
    parser.add_argument("--target-decay", type=float, default=0.95, help="lcm: EMA decay of the target network")
    parser.add_argument("--lcm-loss", default="huber", choices=["huber", "l2"], help="lcm: pseudo-Huber or L2")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    np.random.seed(args.seed)
    if args.out is None:
        model_dir = Path(__file__).parent.parent  # model/: the bundled model and its adapters
        outs = {"lora": f"loras/{args.style}.safetensors", "lcm": "shapes-lcm"}
        args.out = model_dir / outs.get(args.stage, "shapes")
    stages = {
        "vae": train_vae,
        "decoder": train_decoder,
        "unet": train_unet,
        "export": export,
        "lora": train_lora,
        "lcm": train_lcm,
    }
    stages[args.stage](args)


if __name__ == "__main__":
    main()
