"""Seeing a run before it ends: the clean-image estimate at each step, and two ways to show it.

- `DenoisedTap` keeps the scheduler's own estimate of the clean latents
  (x̂0) from its latest step: `pred_original_sample` (DDIM, Euler, Euler
  ancestral, DDPM), `denoised` (LCM), or the converted model output that
  multistep solvers predicting x0 keep (DPM-Solver++, UniPC). PNDM has none;
  callers then fall back to the noisy latents.
- `LatentProjector` maps latents to RGB with one linear layer fitted to the
  model's own VAE when first used (the well-known trick of SD previews, but
  fitted rather than hard-coded, so it works for any latent channel count).
  Costs a small matmul per preview, against a VAE decode.
- `decode_latents` is the full VAE decode (journeys, and `vae` previews).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

#: Longest side of a preview image: previews are for watching, not for keeping.
PREVIEW_MAX_SIDE = 256


class DenoisedTap:
    """Wraps a scheduler's `step` while a run uses it and remembers the latest x̂0."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def attach(self, scheduler: Any) -> None:
        original = scheduler.step

        # wraps() keeps the signature visible: pipelines pass `generator` and `eta` only to a
        # step() whose signature names them (an ancestral sampler would lose its seed otherwise).
        @functools.wraps(original)
        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.value = _denoised_from(scheduler, out)
            return out

        scheduler.step = step  # an instance attribute: the class (and other instances) stay untouched

    @staticmethod
    def detach(scheduler: Any) -> None:
        scheduler.__dict__.pop("step", None)


def _denoised_from(scheduler: Any, out: Any) -> torch.Tensor | None:
    if isinstance(out, tuple):
        return out[1] if len(out) > 1 else _solver_x0(scheduler)
    for name in ("pred_original_sample", "denoised"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return _solver_x0(scheduler)


def _solver_x0(scheduler: Any) -> torch.Tensor | None:
    """Multistep solvers that predict x0 keep it as their latest model output."""
    outputs = getattr(scheduler, "model_outputs", None)
    config = scheduler.config
    predicts_x0 = config.get("algorithm_type") in ("dpmsolver++", "sde-dpmsolver++") or config.get("predict_x0", False)
    if outputs and predicts_x0 and outputs[-1] is not None:
        return outputs[-1]
    return None


class LatentProjector:
    """Latents → RGB by least squares, fitted on the model's VAE encoding of flat and split colours."""

    def __init__(self, pipe: DiffusionPipeline):
        self._pipe = pipe
        self._weights: torch.Tensor | None = None  # (channels + 1, 3)

    def images(self, latents: torch.Tensor, size: tuple[int, int]) -> list[Image.Image]:
        """One RGB preview per latent, scaled towards `size` (width, height) but at most PREVIEW_MAX_SIDE."""
        import numpy as np
        import torch
        from PIL import Image

        weights = self._fitted()
        flat = latents.detach().to("cpu", torch.float32).permute(0, 2, 3, 1)  # (n, h, w, c)
        rgb = torch.cat([flat, torch.ones_like(flat[..., :1])], dim=-1) @ weights
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        scale = min(1.0, PREVIEW_MAX_SIDE / max(size))
        shown = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        return [
            Image.fromarray(np.ascontiguousarray(p), mode="RGB").resize(shown, Image.Resampling.BILINEAR)
            for p in pixels
        ]

    def prepare(self) -> None:
        """Fit now rather than at the first preview."""
        self._fitted()

    def _fitted(self) -> torch.Tensor:
        if self._weights is None:
            self._weights = self._fit()
        return self._weights

    def _fit(self) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        generator = torch.Generator().manual_seed(0)
        colours = torch.rand(48, 3, 1, 1, generator=generator) * 2 - 1
        images = colours.expand(48, 3, 64, 64).clone()
        images[24:, :, :, 32:] = torch.rand(24, 3, 1, 1, generator=generator) * 2 - 1  # two-colour splits
        latents = encode_latents(self._pipe, images)
        target = F.adaptive_avg_pool2d(images, (latents.shape[-2], latents.shape[-1]))
        x = latents.float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        y = target.permute(0, 2, 3, 1).reshape(-1, 3)
        return torch.linalg.lstsq(x, y).solution


def encode_latents(pipe: DiffusionPipeline, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (scaled as the UNet sees them) of images in [-1, 1], on the CPU in float32."""
    import torch

    with torch.no_grad(), _vae_precision(pipe.vae) as dtype:
        latents = pipe.vae.encode(pixels.to(pipe.vae.device, dtype)).latent_dist.mode()
    return (latents * pipe.vae.config.scaling_factor).to("cpu", torch.float32)


def decode_latents(pipe: DiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Full VAE decode of scaled latents into RGB images."""
    import torch

    with torch.no_grad(), _vae_precision(pipe.vae) as dtype:
        decoded = pipe.vae.decode(latents.to(pipe.vae.device, dtype) / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded.float(), output_type="pil")


class _vae_precision:
    """SDXL's VAE overflows in float16; run it in float32 for the call, as diffusers' pipelines do."""

    def __init__(self, vae: Any):
        self.vae = vae
        import torch

        self.upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)

    def __enter__(self) -> torch.dtype:
        import torch

        if self.upcast:
            self.vae.to(torch.float32)
        return self.vae.dtype

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.upcast:
            self.vae.to(torch.float16)
