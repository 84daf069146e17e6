"""The generation engine: one diffusers text-to-image pipeline, loaded once, many requests.

    engine = Engine.load("model/shapes")                     # once per process
    request = engine.validate(GenerationRequest(prompt="a red circle"))
    [result] = engine.generate([request], on_step=report)    # per job (or batch of jobs)

What it adds to a bare diffusers pipeline:

- Request validation up front, with errors that name the field and what is
  accepted (`InvalidRequestError`, a ValueError), and defaults resolved from
  the model (`ModelInfo`). The rules are the API's (`diffq.app.contract.rules`, no
  torch); what they need of the model is in `ModelInfo`, which the worker
  publishes, so the API refuses at submit what `validate` would refuse.
- Schedulers picked by name per request (see `diffq.model.schedulers`), each built
  once from the model's own scheduler config.
- Batching: requests that share size, steps, scheduler and guidance scale run
  as one pipeline call, and give the same images as if run alone.
- Reproducibility: image k of a request starts from, and draws all its noise
  from, its own CPU `torch.Generator` seeded with `seed + k`. Same request +
  seed on the same machine gives identical pixels, whatever else is in the
  batch (up to float rounding of batched kernels), and the initial noise does
  not depend on the device.
- Progress and cancellation: `on_step` is called after every denoising step
  with the latents and the scheduler's estimate of the clean latents (x̂0);
  whatever it raises stops the run between steps and propagates.
  `preview_images` turns either into pictures (a fitted linear projection, or
  the VAE); `journey=True` on a request returns x̂0 decoded at every step
  (see `diffq.model.preview`).
- Warnings for prompt words the text encoder never sees (unknown or cut off),
  see `diffq.model.prompt_check`.
- Image editing with the same components (no second copy of the weights):
  image-to-image, inpainting and outpainting through diffusers' own
  img2img/inpaint pipelines made with `from_pipe`. An ordinary 4-channel
  UNet inpaints by re-imposing the known region's latents at every step
  (diffusers does this); a 9-channel inpainting checkpoint can be loaded
  beside the model (`inpaint_path`) and then serves inpaint and outpaint.
  The kept region is pasted back after decoding (see `diffq.model.editing`).
- LoRA adapters per request (`loras=(("stripes", 0.8),)`): files in the
  engine's adapter folder, loaded with diffusers/peft and cached in the
  pipeline (see `diffq.model.adapters`); requests with different adapters or
  weights never share a pipeline call.

GPU fast path (`Engine.load(fast_path=...)`, on by default on CUDA, off elsewhere so
the CPU path stays exactly as it was): PyTorch's fused scaled-dot-product
attention set explicitly in the UNet and VAE (diffusers' `AttnProcessor2_0`),
channels_last weights for their convolutions, optionally the UNet compiled
with `torch.compile` (`warm_up` then compiles it before the first job), and
VAE tiling/slicing for calls with more pixels than `vae_tiling_pixels`.
Half precision is the dtype's business ("auto": float16 on CUDA). A CUDA
out-of-memory error reaches the caller as `torch.OutOfMemoryError`
(`is_out_of_memory`); `free_memory` then returns the cached blocks, and the
caller may retry with fewer images (the worker splits a batch in halves).

Importing this module does not import torch or diffusers (they load in
`Engine.load`), so request/result types can be used without the model stack.

Threads: `generate` holds a lock for the whole run, because the pipeline
object and the schedulers are stateful (`generate` swaps the pipeline's
scheduler for the call and restores it). Concurrent calls are safe but run
one after the other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffq.app.contract.rules import (
    MAX_GUIDANCE_SCALE,
    MAX_SEED,
    MIN_GUIDANCE_SCALE,
    USED_BY,
    max_steps_for,
    negative_prompt_problem,
    strength_for,
    strength_problem,
)

from .adapters import Adapters, LoraSpec
from .editing import Mode, Padding, binary_mask, outpaint_canvas, paste_back
from .preview import DenoisedTap, LatentProjector, decode_latents, encode_latents
from .prompt_check import prompt_warnings
from .schedulers import SCHEDULERS, build_scheduler, is_compatible, name_for_scheduler
from .single_file import config_folder, is_single_file, load_single_file, sidecar

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline, SchedulerMixin
    from PIL import Image

__all__ = [
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "InvalidRequestError",
    "is_out_of_memory",
    "Mode",
    "ModelInfo",
    "ModelLoadError",
    "Padding",
    "StepCallback",
    "StopGeneration",
    "UnknownSchedulerError",
]

#: Default upper limit of `steps`; `Engine.load(max_steps=...)` changes it.
DEFAULT_MAX_STEPS = 150
#: Default upper limit of `num_images` per request; `Engine.load(max_images=...)` changes it.
DEFAULT_MAX_IMAGES = 8
#: Optional file in the model folder with diffq's defaults for that model.
SETTINGS_FILE = "diffq.json"
#: Keys `diffq.json` may set (others, e.g. training records, are ignored).
SETTINGS_KEYS = {
    "family": str,
    "name": str,
    "default_width": int,
    "default_height": int,
    "min_size": int,
    "max_size": int,
    "size_multiple": int,
    "default_steps": int,
    "default_guidance_scale": float,
    "default_scheduler": str,
    "lcm": bool,
}
#: Files that count as weights for `ModelInfo.weights_hash`.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".gguf")
DTYPES = ("float16", "bfloat16", "float32")
#: `torch.compile` modes `Engine.load(compile_mode=...)` accepts.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Autotuned kernels and inductor's fusions, without CUDA graphs: diffq's batches change shape
#: from call to call, and CUDA graphs would record (and keep memory for) one graph per shape.
DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"
#: Fast path: VAE tiling for images with more pixels than this, slicing for batches with more.
DEFAULT_VAE_TILING_PIXELS = 1024 * 1024
#: diffusers' SD/SDXL/LCM pipelines reject sizes that are not multiples of 8.
_PIPELINE_SIZE_MULTIPLE = 8


class StopGeneration(Exception):
    """Raise from `on_step` to stop a run between two denoising steps.

    The engine does not catch it (nor any other exception from `on_step`):
    it reaches the caller of `generate`, which then has no results for the
    interrupted batch.
    """


class InvalidRequestError(ValueError):
    """A request field holds a value this model does not accept; `field` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class UnknownSchedulerError(InvalidRequestError):
    """A scheduler name this model does not offer; the message lists those it does."""

    def __init__(self, name: object, accepted: Sequence[str]):
        self.name = name
        self.accepted = list(accepted)
        super().__init__("scheduler", f"unknown scheduler {name!r}; accepted: {', '.join(self.accepted)}")


class ModelLoadError(ValueError):
    """The folder is not a pipeline the engine can serve, or its diffq.json is inconsistent."""


@dataclass(frozen=True)
class GenerationRequest:
    """One job. `None` fields take the model's defaults (see `Engine.validate`).

    Editing modes take `image` (RGB, the output's size for img2img and inpaint)
    and, for inpaint, a same-size `mask` (white = repaint); outpaint takes
    `outpaint` and makes an image that much larger. Their width and height
    follow from the image: leave them None (or equal to it).
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    seed: int = 0
    num_images: int = 1  # image k uses seed + k
    mode: str = Mode.TXT2IMG.value
    image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float | None = None  # 0 < strength <= 1: how much of the input is re-noised
    outpaint: Padding | None = None
    journey: bool = False  # also return the clean-image estimate decoded at every step
    loras: LoraSpec = ()  # (adapter name, weight) pairs, applied for this request only


@dataclass
class GenerationResult:
    """The images of one request, in the order of their seeds."""

    images: list[Image.Image]  # RGB
    seeds: list[int]  # seeds[k] == request.seed + k: rerun image k alone with seed=seeds[k], num_images=1
    warnings: list[str]  # for the user: prompt words the model ignored, and why
    parameters: dict[str, Any]  # resolved request plus model name and weights hash
    journeys: list[list[Image.Image]] = dataclasses.field(default_factory=list)  # per image, one frame per step


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model accepts and what it does by default."""

    name: str
    pipeline_class: str  # e.g. "StableDiffusionPipeline", "StableDiffusionXLPipeline"
    weights_hash: str  # sha256 (hex) over the folder's weight files, names included
    device: str
    dtype: str  # "float32" | "float16" | "bfloat16"
    default_width: int
    default_height: int
    min_size: int
    max_size: int
    size_multiple: int  # width and height must be multiples of it
    default_steps: int
    max_steps: int
    default_guidance_scale: float
    default_scheduler: str
    schedulers: list[str]  # names this model accepts, a subset of diffq.model.schedulers.SCHEDULERS
    max_images: int = DEFAULT_MAX_IMAGES  # per request
    modes: list[str] = dataclasses.field(default_factory=lambda: [mode.value for mode in Mode])
    inpaint_unet_channels: int = 4  # 9 when a dedicated inpainting checkpoint serves inpaint/outpaint
    family: str = ""  # which LoRA adapters fit: "sd1", "sd2", "sdxl", or diffq.json's "family" (else the name)
    # Schedulers whose steps cap is below max_steps: "lcm" samples from the original_inference_steps
    # timesteps it was distilled on.
    scheduler_max_steps: dict[str, int] = dataclasses.field(default_factory=dict)
    negative_prompt: bool = True  # whether the pipeline takes a negative prompt
    load_seconds: float = 0.0  # how long `Engine.load` took


#: on_step(step, total, latents_by_request, denoised_by_request): step counts from 1 to total;
#: denoised is the scheduler's clean-latents estimate x̂0 (the latents where it has none).
StepCallback = Callable[[int, int, "dict[int, torch.Tensor]", "dict[int, torch.Tensor]"], None]


class Engine:
    """A loaded pipeline plus everything needed to serve requests with it. Build with `Engine.load`."""

    def __init__(
        self,
        pipe: DiffusionPipeline,
        info: ModelInfo,
        schedulers: Mapping[str, SchedulerMixin],
        inpaint_pipe: DiffusionPipeline | None = None,
        *,
        vae_tiling_pixels: int = 0,
        fast_path: Sequence[str] = (),
        adapters: Adapters | None = None,
    ):
        self.pipe = pipe
        #: LoRA adapters this engine may apply per request (an empty folder: none).
        self.adapters = adapters if adapters is not None else Adapters(None)
        #: What `load` applied for speed, for the worker's start-up log (empty: the plain path).
        self.fast_path = list(fast_path)
        self._vae_tiling_pixels = vae_tiling_pixels  # 0: never tile or slice
        self.info = info
        self._schedulers = dict(schedulers)
        self._inpaint_pipe = inpaint_pipe  # a 9-channel checkpoint, if one is configured
        self._img2img_pipe: DiffusionPipeline | None = None  # made from `pipe` when first needed
        self._projector = LatentProjector(pipe)
        self._tokenizers = [getattr(pipe, name) for name in ("tokenizer", "tokenizer_2") if getattr(pipe, name, None)]
        self._takes_negative_prompt = _takes_negative_prompt(pipe)
        # SDXL encodes a missing negative prompt as zeros but "" as text: the
        # two must not share a batch, or batching would change the images.
        self._empty_negative_is_special = bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False))
        self._lock = threading.Lock()

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        name: str | None = None,
        max_steps: int = DEFAULT_MAX_STEPS,
        max_images: int = DEFAULT_MAX_IMAGES,
        inpaint_path: str | Path | None = None,
        fast_path: bool | None = None,
        compile: bool = False,
        compile_mode: str = DEFAULT_COMPILE_MODE,
        vae_tiling_pixels: int = DEFAULT_VAE_TILING_PIXELS,
        lora_dir: str | Path | None = None,
        lora_cache_size: int = 8,
        single_file_config: str | Path | None = None,
    ) -> Engine:
        """Load a diffusers pipeline folder once, offline, onto `device` in `dtype`.

        device: "auto" (CUDA if available, else CPU) or a torch device string.
        dtype: "auto" (float16 on CUDA, float32 elsewhere), "float16", "bfloat16" or "float32".
        name: the model's name in `ModelInfo`; default: diffq.json's "name", else the folder's name.
        inpaint_path: a 9-channel inpainting checkpoint of the same family (e.g. SD 1.5
            inpainting beside SD 1.5) that then serves inpaint and outpaint requests.
        fast_path: None (on for CUDA devices only), True or False: SDPA attention and
            channels_last in UNet and VAE, VAE tiling/slicing above `vae_tiling_pixels`
            (0: never), and `compile`. Off, the pipeline runs exactly as diffusers loads it.
        compile: with the fast path, `torch.compile` the main UNet in `compile_mode` (one of
            COMPILE_MODES); it compiles at its first calls: call `warm_up` before serving.
        path: a diffusers folder, or a single-file checkpoint (`.safetensors`, A1111/Civitai
            layout) read with diffusers' `from_single_file`, its configs from `single_file_config`
            or its `<name>.json` (see `diffq.model.single_file`).
        lora_dir: the folder of LoRA adapters requests may name; lora_cache_size: how many
            stay loaded in the pipeline.

        Raises FileNotFoundError (no pipeline folder), ValueError (bad device or
        dtype) or ModelLoadError (a pipeline the engine cannot serve).
        """
        import time

        started = time.monotonic()
        folder = Path(path)
        torch_device = _resolve_device(device)
        dtype_name = _resolve_dtype(dtype, torch_device)
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode: {compile_mode!r} is not one of: {', '.join(COMPILE_MODES)}")
        if isinstance(vae_tiling_pixels, bool) or not isinstance(vae_tiling_pixels, int) or vae_tiling_pixels < 0:
            raise ValueError(f"vae_tiling_pixels: {vae_tiling_pixels!r} is not an integer >= 0")
        fast = torch_device.type == "cuda" if fast_path is None else bool(fast_path)
        if is_single_file(folder):
            settings = _checked_settings(sidecar(folder), folder.with_suffix(".json"))
            pipe = _load_single_file(folder, config_folder(folder, single_file_config), torch_device, dtype_name)
        else:
            settings = _read_settings(folder) if (folder / "model_index.json").is_file() else {}
            pipe = _load_pipeline(folder, torch_device, dtype_name)
        _check_supported(pipe, inpainting=False)
        inpaint_pipe = None
        if inpaint_path is not None:
            inpaint_pipe = _load_pipeline(Path(inpaint_path), torch_device, dtype_name)
            _check_supported(inpaint_pipe, inpainting=True)

        schedulers = _offered_schedulers(pipe, settings)
        built = {name: build_scheduler(name, pipe.scheduler.config) for name in schedulers}
        info = ModelInfo(
            name=name or settings.get("name") or (folder.stem if is_single_file(folder) else folder.resolve().name),
            pipeline_class=type(pipe).__name__,
            weights_hash=weights_hash(folder),
            device=str(torch_device),
            dtype=dtype_name,
            max_steps=max_steps,
            max_images=max_images,
            schedulers=schedulers,
            inpaint_unet_channels=inpaint_pipe.unet.config.in_channels if inpaint_pipe else 4,
            family=settings.get("family") or model_family(pipe) or name or settings.get("name") or folder.stem,
            scheduler_max_steps=_scheduler_step_caps(built, max_steps),
            negative_prompt=_takes_negative_prompt(pipe),
            **_model_defaults(pipe, settings, schedulers),
        )
        _check_info(info)
        applied: list[str] = []
        if fast:
            applied = _apply_fast_path(pipe, compile_mode=compile_mode if compile else None)
            if inpaint_pipe is not None:
                applied += [f"inpaint model: {item}" for item in _apply_fast_path(inpaint_pipe, compile_mode=None)]
            if vae_tiling_pixels:
                applied.append(
                    f"VAE tiling above {vae_tiling_pixels} pixels per image, slicing above "
                    f"{vae_tiling_pixels} pixels per call"
                )
        info = dataclasses.replace(info, load_seconds=round(time.monotonic() - started, 3))
        return cls(
            pipe,
            info,
            built,
            inpaint_pipe,
            vae_tiling_pixels=vae_tiling_pixels if fast else 0,
            fast_path=applied,
            adapters=Adapters(lora_dir, lora_cache_size),
        )

    # -- validation ----------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """Check every field against this model and return the request with defaults filled in.

        Validating a validated request returns it unchanged. Raises
        InvalidRequestError (UnknownSchedulerError for the scheduler), whose
        message starts with the field's name and says what is accepted.
        """
        info = self.info
        _check_text("prompt", request.prompt, allow_empty=False)
        _check_text("negative_prompt", request.negative_prompt, allow_empty=True)
        problem = negative_prompt_problem(request.negative_prompt, self._takes_negative_prompt, info.pipeline_class)
        if problem is not None:
            raise InvalidRequestError("negative_prompt", problem)
        scheduler = info.default_scheduler if request.scheduler is None else request.scheduler
        if scheduler not in info.schedulers:
            raise UnknownSchedulerError(scheduler, info.schedulers)
        mode = self._check_mode(request)
        loras = tuple((name, weight) for name, weight in request.loras)
        if (problem := self.adapters.check(loras)) is not None:
            raise InvalidRequestError("loras", problem)
        loras = tuple((name, float(weight)) for name, weight in loras)
        if mode.takes_image:
            width, height = self._edit_size(request, mode)
        else:
            width = info.default_width if request.width is None else request.width
            height = info.default_height if request.height is None else request.height
        for field, size in (("width", width), ("height", height)):
            _check_int(field, size, info.min_size, info.max_size)
            if size % info.size_multiple:
                raise InvalidRequestError(field, f"{size} is not a multiple of {info.size_multiple}")
        steps = info.default_steps if request.steps is None else request.steps
        _check_int("steps", steps, 1, max_steps_for(scheduler, info.max_steps, info.scheduler_max_steps))
        strength = self._check_strength(request, mode, steps)
        guidance = info.default_guidance_scale if request.guidance_scale is None else request.guidance_scale
        if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
            raise InvalidRequestError("guidance_scale", f"{guidance!r} is not a finite number")
        if not MIN_GUIDANCE_SCALE <= guidance <= MAX_GUIDANCE_SCALE:
            raise InvalidRequestError(
                "guidance_scale",
                f"{guidance} is out of range; accepted: {MIN_GUIDANCE_SCALE:g}..{MAX_GUIDANCE_SCALE:g}",
            )
        _check_int("num_images", request.num_images, 1, info.max_images)
        _check_int("seed", request.seed, 0, MAX_SEED)
        return dataclasses.replace(
            request,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=float(guidance),
            scheduler=scheduler,
            mode=mode.value,
            strength=strength,
            loras=loras,
        )

    def _check_mode(self, request: GenerationRequest) -> Mode:
        """The mode, and that exactly the inputs it takes are present."""
        try:
            mode = Mode(request.mode)
        except ValueError:
            accepted = ", ".join(self.info.modes)
            raise InvalidRequestError("mode", f"unknown mode {request.mode!r}; accepted: {accepted}") from None
        if mode.value not in self.info.modes:
            raise InvalidRequestError("mode", f"{mode.value} is not offered by this model; accepted: {self.info.modes}")
        for field, modes in USED_BY.items():
            present = getattr(request, field) is not None
            if present and mode not in modes:
                names = ", ".join(m.value for m in modes)
                raise InvalidRequestError(field, f"is only used by mode {names}, not {mode.value}")
            if not present and mode in modes and field != "strength":
                raise InvalidRequestError(field, f"is required by mode {mode.value}")
        return mode

    def _edit_size(self, request: GenerationRequest, mode: Mode) -> tuple[int, int]:
        """Output size of an editing request: the input's (plus the outpainting border)."""
        from PIL import Image

        image = request.image
        if not isinstance(image, Image.Image):
            raise InvalidRequestError("image", f"must be a PIL image, got {type(image).__name__}")
        size = image.size
        if mode is Mode.INPAINT:
            mask = request.mask
            if not isinstance(mask, Image.Image):
                raise InvalidRequestError("mask", f"must be a PIL image, got {type(mask).__name__}")
            if mask.size != size:
                raise InvalidRequestError(
                    "mask",
                    f"is {mask.width}×{mask.height} but the image is {image.width}×{image.height}; "
                    "they must be the same size",
                )
        if mode is Mode.OUTPAINT:
            padding = request.outpaint
            if not isinstance(padding, Padding):
                raise InvalidRequestError("outpaint", f"must be a Padding, got {type(padding).__name__}")
            for side in ("left", "top", "right", "bottom"):
                _check_int(f"outpaint.{side}", getattr(padding, side), 0, self.info.max_size)
            if padding.is_empty:
                raise InvalidRequestError("outpaint", "adds no pixels; give at least one side > 0")
            size = padding.canvas_size(*size)
        field = "outpaint" if mode is Mode.OUTPAINT else "image"
        for requested, actual, name in ((request.width, size[0], "width"), (request.height, size[1], "height")):
            if requested is not None and requested != actual:
                raise InvalidRequestError(
                    name,
                    f"is {requested} but {mode.value} makes an image {size[0]}×{size[1]} (the input's "
                    "size); omit width and height, or resize the input",
                )
        info = self.info
        for actual in size:
            if not info.min_size <= actual <= info.max_size or actual % info.size_multiple:
                raise InvalidRequestError(
                    field,
                    f"makes an image {size[0]}×{size[1]}; width and height must be multiples of "
                    f"{info.size_multiple} in {info.min_size}..{info.max_size}",
                )
        return size

    @staticmethod
    def _check_strength(request: GenerationRequest, mode: Mode, steps: int) -> float | None:
        strength = strength_for(mode, request.strength)
        if strength is None:
            return None
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
            raise InvalidRequestError("strength", f"{strength!r} is not accepted; accepted: 0 < strength <= 1")
        if (problem := strength_problem(strength, steps)) is not None:
            raise InvalidRequestError("strength", problem)
        return float(strength)

    def prompt_warnings(self, request: GenerationRequest) -> list[str]:
        """What of the request's text the model will ignore, for the user (see diffq.model.prompt_check)."""
        warnings = prompt_warnings(self._tokenizers, request.prompt, request.negative_prompt)
        guidance = self.info.default_guidance_scale if request.guidance_scale is None else request.guidance_scale
        if request.negative_prompt and self.pipe.unet.config.time_cond_proj_dim is not None:
            warnings.append(
                "negative prompt ignored: this model takes the guidance scale as an input of its UNet "
                "(LCM-distilled) and runs no classifier-free guidance"
            )
        elif request.negative_prompt and not self._uses_guidance(guidance):
            warnings.append(
                f"negative prompt ignored: guidance_scale {guidance} turns classifier-free guidance off "
                "(it needs guidance_scale > 1)"
            )
        return warnings

    def _uses_guidance(self, guidance_scale: float) -> bool:
        """Whether the pipeline runs classifier-free guidance (and so uses the negative prompt).

        Same rule as diffusers' `do_classifier_free_guidance`: LCM-distilled
        UNets take the guidance scale as an input instead.
        """
        return guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self, requests: Sequence[GenerationRequest], on_step: StepCallback | None = None
    ) -> list[GenerationResult]:
        """Generate the images of `requests`; results come back in request order.

        All requests are validated before anything runs. Requests that share a
        batch key (width, height, steps, scheduler, guidance_scale, mode,
        strength, LoRA adapters; see `_batch_groups`) run as one batched
        pipeline call; other groups run one after the other.

        on_step(step, total, latents_by_request, denoised_by_request) is
        called after every denoising step of each group: step counts from 1 to
        total (the scheduler's number of timesteps, which for "pndm" is
        steps + 1), and latents_by_request maps the index of each request of
        the running group (in `requests`) to its latents, shape (num_images,
        channels, height // f, width // f) for the VAE factor f;
        denoised_by_request holds the scheduler's estimate of the clean
        latents in the same shape. The tensors are views into the pipeline's
        state: read them, do not modify them. Whatever
        on_step raises (`StopGeneration`, a caller's own cancel exception)
        stops the run and propagates; groups already finished are lost too.
        """
        resolved = [self.validate(request) for request in requests]
        results: list[GenerationResult | None] = [None] * len(resolved)
        with self._lock:
            for indices in self._batch_groups(resolved):
                for index, result in zip(indices, self._run_batch(resolved, indices, on_step), strict=True):
                    results[index] = result
        return results  # type: ignore[return-value]  # every index belongs to one group

    def _batch_groups(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Indices of requests that can share a pipeline call, groups in order of first appearance."""
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            key: tuple = (
                request.width,
                request.height,
                request.steps,
                request.scheduler,
                request.guidance_scale,
                request.mode,
                request.strength,
                request.loras,
            )
            if self._empty_negative_is_special:
                key += (request.negative_prompt == "",)
            groups.setdefault(key, []).append(index)
        return list(groups.values())

    def _run_batch(
        self, requests: Sequence[GenerationRequest], indices: list[int], on_step: StepCallback | None
    ) -> list[GenerationResult]:
        """One pipeline call for the requests at `indices`, all sharing a batch key."""
        import torch

        # 1. Expand requests into images: one prompt, negative prompt,
        #    generator (and input) per image, so image k of a request sees seed + k only.
        first = requests[indices[0]]
        assert first.steps is not None and first.scheduler is not None  # validate() resolved them
        mode = Mode(first.mode)
        prompts: list[str] = []
        negative_prompts: list[str] = []
        generators: list[torch.Generator] = []
        inputs: list[tuple[Image.Image, Image.Image | None]] = []  # (image, mask) per image
        rows: dict[int, slice] = {}
        for index in indices:
            request = requests[index]
            start = len(prompts)
            edit_input = _edit_input(request, mode)
            for k in range(request.num_images):
                prompts.append(request.prompt)
                negative_prompts.append(request.negative_prompt)
                generators.append(torch.Generator(device="cpu").manual_seed(request.seed + k))
                inputs.append(edit_input)
            rows[index] = slice(start, len(prompts))

        # 2. Call the mode's pipeline with the group's shared settings.
        pipe = self._pipeline(mode)
        kwargs: dict[str, Any] = dict(
            prompt=prompts,
            width=first.width,
            height=first.height,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            num_images_per_prompt=1,
            generator=generators,
            output_type="pil",
        )
        masked = mode in (Mode.INPAINT, Mode.OUTPAINT)
        known = None
        if mode.takes_image:
            kwargs.update(image=[image for image, _ in inputs], strength=first.strength)
        if masked and self._inpaint_pipe is not None:
            kwargs["mask_image"] = [mask for _, mask in inputs]
        elif masked:
            known = _KnownRegion.encode(
                pipe,
                inputs,
                [request.seed + k for request in (requests[i] for i in indices) for k in range(request.num_images)],
            )
        if self._takes_negative_prompt:
            # None (not [""] * n) when no request has one: SDXL then uses zeros.
            kwargs["negative_prompt"] = negative_prompts if any(negative_prompts) else None
        tap = DenoisedTap()
        journey_rows = [rows[i] for i in indices if requests[i].journey]
        frames: list[list[Image.Image]] = [[] for _ in prompts]
        journey = _Journey(pipe, journey_rows, frames) if journey_rows else None
        kwargs["callback_on_step_end"] = _step_callback(on_step, rows, first.steps, known, tap, journey)
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
        accepted = inspect.signature(pipe.__call__).parameters
        kwargs = {key: value for key, value in kwargs.items() if key in accepted}  # img2img takes no size
        with (
            self._scheduler_in_place(pipe, first.scheduler, tap),
            self._vae_memory(pipe, first, len(prompts)),
            self.adapters.applied(pipe, first.loras),
        ):
            images = [image.convert("RGB") for image in pipe(**kwargs).images]
        if masked:
            images = [
                paste_back(image, original, mask)  # type: ignore[arg-type]  # masked: every input has one
                for image, (original, mask) in zip(images, inputs, strict=False)
            ]

        # 3. Split the images back per request.
        results = []
        for index in indices:
            request = requests[index]
            results.append(
                GenerationResult(
                    journeys=frames[rows[index]] if request.journey else [],
                    images=images[rows[index]],
                    seeds=[request.seed + k for k in range(request.num_images)],
                    warnings=self.prompt_warnings(request),
                    parameters=self._parameters(request),
                )
            )
        return results

    def _pipeline(self, mode: Mode) -> DiffusionPipeline:
        """The pipeline for `mode`; editing pipelines share the loaded components (made once, under the lock)."""
        if mode is Mode.TXT2IMG:
            return self.pipe
        if mode is not Mode.IMG2IMG and self._inpaint_pipe is not None:
            return self._inpaint_pipe
        # Ordinary UNets inpaint through the image-to-image pipeline plus `_KnownRegion`:
        # diffusers' own inpainting pipeline only takes UNets with 4 (or 9) input
        # channels, and the shapes model's latents have 8.
        if self._img2img_pipe is None:
            from diffusers import AutoPipelineForImage2Image

            self._img2img_pipe = AutoPipelineForImage2Image.from_pipe(self.pipe)
            self._img2img_pipe.set_progress_bar_config(disable=True)
        return self._img2img_pipe

    @contextmanager
    def _scheduler_in_place(self, pipe: DiffusionPipeline, name: str, tap: DenoisedTap) -> Iterator[None]:
        """Put the cached scheduler `name` into `pipe` for one call, with `tap` on it, then restore.

        Safe only under `self._lock`: a pipeline has one scheduler slot.
        A cached scheduler is reused across calls because diffusers resets its
        state in `set_timesteps` at the start of every pipeline call.
        """
        original = pipe.scheduler
        scheduler = pipe.scheduler = self._schedulers[name]
        tap.attach(scheduler)
        try:
            yield
        finally:
            tap.detach(scheduler)
            pipe.scheduler = original

    @contextmanager
    def _vae_memory(self, pipe: DiffusionPipeline, request: GenerationRequest, images: int) -> Iterator[None]:
        """Fast path: tiled VAE decoding (and encoding) for an image with more than
        `vae_tiling_pixels` pixels, one image at a time for a call with more; restored after.

        Tiling bounds the VAE's memory whatever the size, at the cost of blended tile
        seams; slicing gives the same images as a batched decode (up to float rounding).
        """
        vae, limit = pipe.vae, self._vae_tiling_pixels
        if not limit or not (hasattr(vae, "use_tiling") and hasattr(vae, "use_slicing")):
            yield
            return
        assert request.width is not None and request.height is not None  # validate() resolved them
        pixels = request.width * request.height
        saved = vae.use_tiling, vae.use_slicing
        vae.use_tiling, vae.use_slicing = pixels > limit, pixels * images > limit
        try:
            yield
        finally:
            vae.use_tiling, vae.use_slicing = saved

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run the default request (two steps) once per batch size, before the first job:
        a compiled UNet compiles here (a second batch size makes its batch dimension
        dynamic, so later batches do not compile again), and CUDA sets up its kernels.
        Returns the seconds it took."""
        import time

        started = time.monotonic()
        steps = min(2, max_steps_for(self.info.default_scheduler, self.info.max_steps, self.info.scheduler_max_steps))
        for size in batch_sizes:
            self.generate([GenerationRequest(prompt="warm up", steps=steps, seed=k) for k in range(size)])
        return time.monotonic() - started

    def free_memory(self) -> None:
        """Give the device's cached, unused memory back (after an out-of-memory error)."""
        import gc

        import torch

        gc.collect()  # an exception's traceback holds the failed run's tensors in a reference cycle
        if torch.device(self.info.device).type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def memory_bytes(self) -> int:
        """Bytes of the weights (parameters and buffers) of every distinct module this engine holds."""
        import torch

        seen: set[int] = set()
        total = 0
        for pipe in (self.pipe, self._inpaint_pipe):
            for component in pipe.components.values() if pipe is not None else ():
                if isinstance(component, torch.nn.Module) and id(component) not in seen:
                    seen.add(id(component))
                    total += sum(t.numel() * t.element_size() for t in [*component.parameters(), *component.buffers()])
        return total

    def to_cpu(self) -> None:
        """Move the weights to CPU RAM (a multi-model worker's second tier); `to_device` brings them back."""
        with self._lock:
            for pipe in (self.pipe, self._inpaint_pipe):
                if pipe is not None:
                    pipe.to("cpu")
        import torch

        if torch.device(self.info.device).type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the device copies are unreferenced now: give their blocks back

    def to_device(self) -> None:
        """Move the weights back to the device the engine was loaded on."""
        with self._lock:
            for pipe in (self.pipe, self._inpaint_pipe):
                if pipe is not None:
                    pipe.to(self.info.device)

    def prepare_previews(self) -> None:
        """Fit the latent projection now (a few VAE encodes), not during the first job's run."""
        self._projector.prepare()

    def preview_images(
        self, latents: torch.Tensor, size: tuple[int, int], decoder: str = "latent"
    ) -> list[Image.Image]:
        """Pictures of latents (or of x̂0) during a run: "latent" is a fitted linear projection
        (cheap, blurry, at most 256 px), "vae" the full decode at the output size."""
        if decoder == "vae":
            return decode_latents(self.pipe, latents)
        if decoder == "latent":
            return self._projector.images(latents, size)
        raise ValueError(f"decoder: {decoder!r} is not one of: latent, vae")

    def _parameters(self, request: GenerationRequest) -> dict[str, Any]:
        """The resolved request for records and metadata: the inputs by size, not by pixels."""
        parameters: dict[str, Any] = {"model": self.info.name, "weights_hash": self.info.weights_hash}
        for field in dataclasses.fields(request):
            value = getattr(request, field.name)
            if field.name in ("image", "mask"):
                value = None if value is None else f"{value.width}x{value.height}"
            elif field.name == "outpaint":
                value = None if value is None else value.model_dump()
            elif field.name == "loras":  # which weights exactly: the file's hash
                value = [
                    {"name": name, "weight": weight, "sha256": self.adapters.sha256(name)} for name, weight in value
                ]
            parameters[field.name] = value
        return parameters


def model_family(pipe: DiffusionPipeline) -> str | None:
    """Which LoRA adapters fit a Stable Diffusion pipeline, from its UNet's text width; None if unknown."""
    if "XL" in type(pipe).__name__:
        return "sdxl"
    return {768: "sd1", 1024: "sd2"}.get(pipe.unet.config.cross_attention_dim)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is torch's out-of-memory error (`torch.OutOfMemoryError`, which
    `torch.cuda.OutOfMemoryError` names too): the run asked the device for more memory than it has."""
    import torch

    out_of_memory = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(error, out_of_memory)


def _edit_input(request: GenerationRequest, mode: Mode) -> tuple[Image.Image, Image.Image | None]:
    """The image (and mask) an editing pipeline starts from; (None, None) for text-to-image.
    ``validate`` has checked that the mode's inputs are there."""
    image, mask, outpaint = request.image, request.mask, request.outpaint
    if mode is Mode.IMG2IMG and image is not None:
        return image.convert("RGB"), None
    if mode is Mode.INPAINT and image is not None and mask is not None:
        return image.convert("RGB"), binary_mask(mask)
    if mode is Mode.OUTPAINT and image is not None and outpaint is not None:
        return outpaint_canvas(image, outpaint)
    assert mode is Mode.TXT2IMG, f"{mode.value} without its inputs"
    return None, None  # type: ignore[return-value]  # text-to-image has no input


def _step_callback(
    on_step: StepCallback | None,
    rows: Mapping[int, slice],
    total: int,
    known: _KnownRegion | None,
    tap: DenoisedTap,
    journey: _Journey | None,
) -> Callable[..., dict]:
    """diffusers' `callback_on_step_end(pipe, step_index, timestep, tensors)`: re-impose the
    known region (inpainting with an ordinary UNet), record journey frames, then report the
    step to `on_step`."""

    def callback(pipe: DiffusionPipeline, step_index: int, timestep: Any, tensors: dict[str, Any]) -> dict:
        if known is not None:
            tensors["latents"] = known.reimpose(pipe, step_index, tensors["latents"])
        latents = tensors["latents"]
        denoised = tap.value if tap.value is not None and tap.value.shape == latents.shape else latents
        if journey is not None:
            journey.record(denoised)
        if on_step is not None:
            on_step(
                step_index + 1,
                getattr(pipe, "num_timesteps", total),
                {i: latents[r] for i, r in rows.items()},
                {i: denoised[r] for i, r in rows.items()},
            )
        return tensors

    return callback


@dataclass
class _Journey:
    """Decodes x̂0 of the images that asked for a journey, once per step."""

    pipe: DiffusionPipeline
    rows: list[slice]
    frames: list[list[Image.Image]]  # per image of the batch

    def record(self, denoised: torch.Tensor) -> None:
        for row in self.rows:
            for offset, image in enumerate(decode_latents(self.pipe, denoised[row])):
                self.frames[row.start + offset].append(image)


@dataclass
class _KnownRegion:
    """Inpainting for a UNet that takes only latents (RePaint-style, as diffusers does for 4 channels).

    After every denoising step the latents outside the mask are replaced by
    the input's latents noised to the level of the next step, so the model
    only invents the masked region and makes it fit what surrounds it.
    """

    latents: torch.Tensor  # the input images' latents, scaled as the UNet sees them: (n, c, h, w)
    repaint: torch.Tensor  # 1 where the model paints, 0 where the input is kept: (n, 1, h, w)
    noise: torch.Tensor  # one fixed noise per image, from its own seed

    @classmethod
    def encode(
        cls, pipe: DiffusionPipeline, inputs: Sequence[tuple[Image.Image, Image.Image | None]], seeds: Sequence[int]
    ):
        import numpy as np
        import torch
        import torch.nn.functional as F

        pixels = pipe.image_processor.preprocess([image for image, _ in inputs])
        latents = encode_latents(pipe, pixels).to(pipe.unet.device, pipe.unet.dtype)
        masks = torch.from_numpy(np.stack([np.asarray(mask) >= 128 for _, mask in inputs])).float()[:, None]
        # A latent cell is repainted if any of its pixels is: the model then paints the whole
        # masked area, and paste-back restores the kept pixels exactly.
        factor = pixels.shape[-1] // latents.shape[-1]
        repaint = F.max_pool2d(masks, kernel_size=factor).to(latents.device, latents.dtype)
        noise = torch.stack(
            [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed)) for seed in seeds]
        ).to(latents.device, latents.dtype)
        return cls(latents=latents, repaint=repaint, noise=noise)

    def reimpose(self, pipe: DiffusionPipeline, step_index: int, latents: torch.Tensor) -> torch.Tensor:
        scheduler = pipe.scheduler
        timesteps = scheduler.timesteps
        # img2img runs the schedule's last `num_timesteps` entries; the next one is the noise level now.
        following = len(timesteps) - pipe.num_timesteps + step_index + 1
        if following < len(timesteps):
            known = scheduler.add_noise(self.latents, self.noise, timesteps[following : following + 1])
        else:
            known = self.latents
        return self.repaint * latents + (1 - self.repaint) * known.to(latents.dtype)


# -- request checks -----------------------------------------------------------------------------


def _check_text(field: str, value: object, *, allow_empty: bool) -> None:
    if not isinstance(value, str):
        raise InvalidRequestError(field, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise InvalidRequestError(field, "must not be empty")


def _check_int(field: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(field, f"{value!r} is not an integer; accepted: {low}..{high}")
    if not low <= value <= high:
        raise InvalidRequestError(field, f"{value} is out of range; accepted: {low}..{high}")


# -- loading helpers ----------------------------------------------------------------------------


def _resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: {device!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:1', ...)") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but CUDA is not available here")
    return resolved


def _resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype == "auto":
        return "float16" if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not supported; accepted: auto, {', '.join(DTYPES)}")
    return dtype


def _read_settings(folder: Path) -> dict[str, Any]:
    """diffq.json's known keys, type-checked; {} when the folder has none."""
    file = folder / SETTINGS_FILE
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{file}: not valid JSON ({error})") from error
    return _checked_settings(raw, file)


def _checked_settings(raw: object, file: Path) -> dict[str, Any]:
    """The known keys of a diffq.json (or a single file's `<name>.json`), type-checked."""
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{file}: must hold a JSON object")
    settings = {}
    for key, expected in SETTINGS_KEYS.items():
        if key not in raw:
            continue
        value = raw[key]
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            raise ModelLoadError(f"{file}: {key!r} must be of type {expected.__name__}, got {value!r}")
        settings[key] = float(value) if expected is float else value
    return settings


def _load_pipeline(folder: Path, device: torch.device, dtype_name: str) -> DiffusionPipeline:
    """A diffusers folder, offline, on `device` in `dtype_name`, without a safety checker."""
    import torch
    from diffusers import DiffusionPipeline

    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    # A service returns images to its own users: no safety checker (and no
    # image processor that only the checker uses).
    index = json.loads(index_file.read_text())
    overrides: dict[str, Any] = {}
    if "safety_checker" in index:
        overrides.update(safety_checker=None, requires_safety_checker=False)
        if "feature_extractor" in index:
            overrides["feature_extractor"] = None
    with warnings.catch_warnings():
        # Newer diffusers renamed `torch_dtype` to `dtype`; older versions know only the former.
        warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(
            folder, torch_dtype=getattr(torch, dtype_name), local_files_only=True, **overrides
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_single_file(path: Path, config: Path, device: torch.device, dtype_name: str) -> DiffusionPipeline:
    """A single-file checkpoint, offline, on `device` in `dtype_name` (see `diffq.model.single_file`)."""
    import torch

    pipe = load_single_file(path, config, getattr(torch, dtype_name))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _apply_fast_path(pipe: DiffusionPipeline, *, compile_mode: str | None) -> list[str]:
    """SDPA attention and channels_last in the UNet and VAE, and `torch.compile` of the UNet
    (in place: `pipe.unet` stays the same module, so `from_pipe` and `config` work as before).
    Returns what was applied, for the log."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    sdpa, kept, channels_last = [], [], []
    for part in ("unet", "vae"):
        module = getattr(pipe, part)
        processors = getattr(module, "attn_processors", None) or {}
        # diffusers' default on torch 2 is AttnProcessor2_0 already: set it explicitly, but
        # leave custom processors (IP-Adapter, LoRA variants, xformers) as the pipeline has them.
        if processors and all(type(p) in (AttnProcessor, AttnProcessor2_0) for p in processors.values()):
            module.set_attn_processor(AttnProcessor2_0())
            sdpa.append(part)
        elif processors:
            kept.append(part)
        module.to(memory_format=torch.channels_last)
        channels_last.append(part)
    applied = []
    if sdpa:
        applied.append(f"SDPA attention (AttnProcessor2_0): {', '.join(sdpa)}")
    if kept:
        applied.append(f"custom attention processors kept: {', '.join(kept)}")
    applied.append(f"channels_last: {', '.join(channels_last)}")
    if compile_mode is not None:
        pipe.unet.compile(mode=compile_mode)
        applied.append(f"torch.compile(unet, mode={compile_mode!r})")
    return applied


def _check_supported(pipe: DiffusionPipeline, *, inpainting: bool) -> None:
    """Only UNet latent-diffusion pipelines (SD 1.x/2.x, SDXL, LCM) are served.

    The main model must take text alone (a UNet whose input is the VAE's
    latents); a 9-channel inpainting checkpoint is only accepted as
    `inpaint_path`, where it takes latents, mask and masked-image latents.
    """
    parts_present = all(getattr(pipe, part, None) is not None for part in ("unet", "vae", "text_encoder", "tokenizer"))
    parameters = inspect.signature(pipe.__call__).parameters
    if not parts_present or not {"prompt", "callback_on_step_end", "generator"} <= parameters.keys():
        raise ModelLoadError(
            f"{type(pipe).__name__} is not supported: diffq serves UNet text-to-image pipelines with a "
            "text encoder, tokenizer and VAE (Stable Diffusion 1.x/2.x, SDXL, LCM)"
        )
    latent_channels = pipe.vae.config.latent_channels
    unet_channels = pipe.unet.config.in_channels
    if inpainting and unet_channels != 2 * latent_channels + 1:
        raise ModelLoadError(
            f"inpaint model: its UNet takes {unet_channels} input channels; an inpainting checkpoint takes "
            f"{2 * latent_channels + 1} (latents, mask, masked image)"
        )
    if not inpainting and unet_channels != latent_channels:
        raise ModelLoadError(
            f"{type(pipe).__name__}: its UNet takes {unet_channels} input channels, not the VAE's "
            f"{latent_channels}; an inpainting checkpoint is served as the inpaint model beside a "
            "text-to-image model"
        )


def _takes_negative_prompt(pipe: DiffusionPipeline) -> bool:
    return "negative_prompt" in inspect.signature(pipe.__call__).parameters


def _scheduler_step_caps(schedulers: Mapping[str, SchedulerMixin], max_steps: int) -> dict[str, int]:
    """Steps caps below `max_steps` per scheduler: LCM samples from the `original_inference_steps`
    timesteps it was distilled on."""
    caps = {}
    if "lcm" in schedulers:
        distilled = schedulers["lcm"].config.get("original_inference_steps")
        if isinstance(distilled, int) and distilled < max_steps:
            caps["lcm"] = distilled
    return caps


def _offered_schedulers(pipe: DiffusionPipeline, settings: Mapping[str, Any]) -> list[str]:
    """Scheduler names this model accepts: those that can honour its noise schedule; LCM only if distilled for it."""
    lcm = settings.get("lcm", type(pipe.scheduler).__name__ == "LCMScheduler")
    return [name for name in SCHEDULERS if (name != "lcm" or lcm) and is_compatible(name, pipe.scheduler.config)]


def _model_defaults(pipe: DiffusionPipeline, settings: Mapping[str, Any], schedulers: list[str]) -> dict[str, Any]:
    """Sizes, steps, guidance and scheduler defaults: diffq.json first, else derived from the configs.

    The default image is the UNet's sample size in pixels (SD 1.x 512,
    SDXL 1024). Sizes must be multiples of the total downsampling of VAE and
    UNet, so that the UNet's skip connections line up (SD: 64), and of 8,
    which diffusers' pipelines check.
    """
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    sample_size = pipe.unet.config.sample_size
    sample_h, sample_w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    unet_factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    multiple = settings.get("size_multiple", math.lcm(_PIPELINE_SIZE_MULTIPLE, vae_factor * unet_factor))
    width = settings.get("default_width", sample_w * vae_factor)
    height = settings.get("default_height", sample_h * vae_factor)
    # Half to twice the native size: outside it, SD-family models mostly produce garbage.
    min_size = settings.get("min_size", max(multiple, _round_up(min(width, height) // 2, multiple)))
    max_size = settings.get("max_size", 2 * max(width, height) // multiple * multiple)

    folder_default = name_for_scheduler(pipe.scheduler)
    scheduler = settings.get("default_scheduler", folder_default if folder_default in schedulers else "dpmpp_2m")
    if scheduler == "lcm":
        # LCM models sample in a few steps; a distilled UNet takes guidance as an input (w-embedding),
        # an LCM-LoRA'd one works best without classifier-free guidance.
        steps = settings.get("default_steps", 4)
        guidance = 8.5 if pipe.unet.config.time_cond_proj_dim is not None else 1.0
    else:
        steps = settings.get("default_steps", 30)
        guidance = 7.5
    return dict(
        default_width=width,
        default_height=height,
        min_size=min_size,
        max_size=max_size,
        size_multiple=multiple,
        default_steps=steps,
        default_guidance_scale=settings.get("default_guidance_scale", guidance),
        default_scheduler=scheduler,
    )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_info(info: ModelInfo) -> None:
    """The defaults must be requests the model accepts (diffq.json could say otherwise)."""
    problems = []
    if info.size_multiple % _PIPELINE_SIZE_MULTIPLE:
        problems.append(f"size_multiple {info.size_multiple} is not a multiple of {_PIPELINE_SIZE_MULTIPLE}")
    if not 0 < info.size_multiple <= info.min_size <= info.max_size:
        problems.append(
            f"need 0 < size_multiple <= min_size <= max_size, got {info.size_multiple}, {info.min_size}, "
            f"{info.max_size}"
        )
    for key in ("default_width", "default_height"):
        size = getattr(info, key)
        if not info.min_size <= size <= info.max_size or size % info.size_multiple:
            accepted = f"a multiple of {info.size_multiple} in {info.min_size}..{info.max_size}"
            problems.append(f"{key} {size} is not {accepted}")
    if not (math.isfinite(info.default_guidance_scale) and info.default_guidance_scale >= 0):
        problems.append(f"default_guidance_scale {info.default_guidance_scale} is not a finite number >= 0")
    if not 1 <= info.default_steps <= info.max_steps:
        problems.append(f"default_steps {info.default_steps} is not in 1..{info.max_steps}")
    if info.default_scheduler not in info.schedulers:
        problems.append(f"default_scheduler {info.default_scheduler!r} is not one of {info.schedulers}")
    if problems:
        raise ModelLoadError(f"model {info.name!r}: " + "; ".join(problems))


def weights_hash(folder: str | Path) -> str:
    """sha256 (hex) over every weight file under `folder`: relative path, then contents, in path order.

    Identifies the weights a result was made with (PNG metadata, caches).
    Reads every byte once: a few seconds for a multi-GB checkpoint.
    """
    folder = Path(folder)
    files = []
    if folder.is_file():  # a single-file checkpoint: its name and bytes
        files, folder = [folder], folder.parent
    for root, dirs, names in os.walk(folder if not files else os.devnull, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # e.g. .cache/huggingface metadata
        files += [Path(root, name) for name in names if name.endswith(WEIGHT_SUFFIXES)]
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.relative_to(folder).as_posix()):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
