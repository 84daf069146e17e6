"""AUTOMATIC1111's ``/sdapi/v1`` requests mapped onto diffq jobs, and diffq's results onto its answers.

A1111 clients (``webuiapi``, Open WebUI, SillyTavern, bots) send the whole
``StableDiffusionProcessing`` parameter set, most of it defaults. The rules:

- Fields this module does not know are ignored, as A1111 ignores them
  (SillyTavern forwards its own ``url`` and ``auth`` in the body), and so
  are the ones with no diffq equivalent whose effect is small (``mask_blur``,
  ``inpainting_fill``, ``inpaint_full_res``, ``eta``, ``s_churn`` …).
- Fields diffq cannot honour are refused when they ask for something
  (``enable_hr: true``, ``restore_faces: true``, ``styles``, a script …) and
  accepted at their do-nothing value: nothing is quietly dropped.
- Omitted ``steps``, ``cfg_scale``, ``width``, ``height`` take the model's
  defaults (A1111's own 512×512 and 50 steps fit no small model).
- ``sampler_name`` and ``scheduler`` go through one table, ``SAMPLERS`` and
  ``SCHEDULES``; diffq's own scheduler names are accepted too.
- ``batch_size`` × ``n_iter`` images are one diffq job; image k has seed
  ``seed + k``, as in A1111. ``seed: -1`` is a random seed.

Pure functions and pydantic models; no Redis, no HTTP.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from diffq.app.contract.records import JobRecord
from diffq.app.core.errors import FieldProblem, InvalidRequestError
from diffq.app.core.uploads import UploadLimits, decode_base64


@dataclass(frozen=True)
class Sampler:
    """An A1111 sampler name and the diffq scheduler that runs it."""

    name: str
    scheduler: str
    aliases: tuple[str, ...] = ()


#: A1111 sampler names → diffq schedulers: the one table both directions are read from.
SAMPLERS = (
    Sampler("Euler a", "euler_a", ("k_euler_a", "k_euler_ancestral")),
    Sampler("Euler", "euler", ("k_euler",)),
    Sampler("DPM++ 2M", "dpmpp_2m", ("k_dpmpp_2m",)),
    Sampler("UniPC", "unipc", ()),
    Sampler("DDIM", "ddim", ()),
    Sampler("PLMS", "pndm", ()),
    Sampler("LCM", "lcm", ("k_lcm",)),
)
#: A1111 ``scheduler`` (noise schedule) values diffq runs: both mean the model's own schedule, which is
#: what every diffq scheduler uses. (name, label)
SCHEDULES = (("automatic", "Automatic"), ("normal", "Normal"))
#: ``override_settings`` keys diffq accepts; the other keys are refused.
OVERRIDES = {
    "sd_model_checkpoint": "picks the model",
    "sd_vae": "only Automatic or None (the model's own VAE)",
    "CLIP_stop_at_last_layers": "only 1",
}


class A1111Request(BaseModel):
    """The fields of A1111's ``StableDiffusionTxt2ImgProcessingAPI`` / ``Img2ImgProcessingAPI`` diffq reads."""

    model_config = ConfigDict(extra="ignore", strict=True, protected_namespaces=())  # JSON types, as sent

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed_strength: float = 0
    sampler_name: str | None = None
    sampler_index: str | None = None  # deprecated in A1111: read when sampler_name is absent
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    # img2img
    init_images: list[str] | None = None
    mask: str | None = None
    resize_mode: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


def sampler_for(name: str | None) -> Sampler | None:
    """The table's sampler for an A1111 name, alias or diffq scheduler name (any case); None: absent."""
    if name is None or not name.strip():
        return None
    wanted = name.strip().lower()
    for sampler in SAMPLERS:
        if wanted in (sampler.name.lower(), sampler.scheduler, *sampler.aliases):
            return sampler
    accepted = ", ".join(sampler.name for sampler in SAMPLERS)
    raise InvalidRequestError(
        [
            FieldProblem(
                "sampler_name", f"{name!r} is not a sampler diffq runs; accepted: {accepted} (GET /sdapi/v1/samplers)"
            )
        ]
    )


def checkpoint_name(title: str) -> str:
    """A model name from an A1111 checkpoint title (``"name [hash]"`` or ``"name.safetensors"``)."""
    name = title.strip()
    if name.endswith("]") and " [" in name:
        name = name[: name.rindex(" [")]
    for suffix in (".safetensors", ".ckpt"):
        name = name.removesuffix(suffix)
    return name


def job_fields(request: A1111Request, img2img: bool, default_model: str | None, limits: UploadLimits) -> dict[str, Any]:
    """The diffq ``JobCreate`` fields for an A1111 request; ``InvalidRequestError`` names what cannot map."""
    _refuse_unsupported(request, img2img)
    fields: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "num_images": request.batch_size * request.n_iter,
    }
    model = _model(request.override_settings or {}) or default_model
    if model is not None:
        fields["model"] = model
    if request.seed >= 0:
        fields["seed"] = request.seed
    sampler = sampler_for(request.sampler_name or request.sampler_index)
    if sampler is not None:
        fields["scheduler"] = sampler.scheduler
    for name, diffq_name in (
        ("steps", "steps"),
        ("cfg_scale", "guidance_scale"),
        ("width", "width"),
        ("height", "height"),
    ):
        value = getattr(request, name)
        if value is not None:
            fields[diffq_name] = value
    if img2img:
        fields.update(_image_fields(request, limits))
    return fields


def _refuse_unsupported(request: A1111Request, img2img: bool) -> None:
    problems = []
    asked = {"enable_hr": request.enable_hr, "restore_faces": request.restore_faces, "tiling": request.tiling}
    problems += [FieldProblem(name, "is not supported by diffq; send false") for name, on in asked.items() if on]
    if request.styles:
        problems.append(FieldProblem("styles", "prompt styles are not supported by diffq; send []"))
    if request.subseed_strength:
        problems.append(FieldProblem("subseed_strength", "variation seeds are not supported by diffq; send 0"))
    if request.script_name:
        problems.append(FieldProblem("script_name", "scripts are not supported by diffq (GET /sdapi/v1/scripts)"))
    if request.alwayson_scripts:
        names = ", ".join(sorted(request.alwayson_scripts))
        problems.append(FieldProblem("alwayson_scripts", f"extensions are not supported by diffq: {names}"))
    if request.scheduler is not None and request.scheduler.strip().lower() not in _schedule_names():
        accepted = ", ".join(label for _, label in SCHEDULES)
        problems.append(
            FieldProblem("scheduler", f"{request.scheduler!r} is not a noise schedule diffq runs; accepted: {accepted}")
        )
    problems += override_problems(request.override_settings or {})
    if img2img and request.resize_mode != 0:
        problems.append(FieldProblem("resize_mode", "only 0 (just resize) is supported"))
    if img2img and not request.init_images:
        problems.append(FieldProblem("init_images", "img2img needs one base64 image"))
    if img2img and request.init_images and len(request.init_images) > 1:
        problems.append(FieldProblem("init_images", "diffq takes one image per request"))
    if problems:
        raise InvalidRequestError(problems)


def _schedule_names() -> set[str]:
    return {value.lower() for pair in SCHEDULES for value in pair}


def override_problems(overrides: dict[str, Any]) -> list[FieldProblem]:
    """What is wrong with ``override_settings`` (or ``POST options``) values diffq reads."""
    problems = []
    for key, value in overrides.items():
        field = f"override_settings.{key}"
        if key not in OVERRIDES:
            problems.append(FieldProblem(field, f"is not supported by diffq; accepted: {', '.join(OVERRIDES)}"))
        elif key == "sd_vae" and value not in (None, "Automatic", "None"):
            problems.append(FieldProblem(field, OVERRIDES[key]))
        elif key == "CLIP_stop_at_last_layers" and value not in (None, 1):
            problems.append(FieldProblem(field, OVERRIDES[key]))
        elif key == "sd_model_checkpoint" and not isinstance(value, str | None):
            problems.append(FieldProblem(field, "must be a model title (GET /sdapi/v1/sd-models)"))
    return problems


def _model(overrides: dict[str, Any]) -> str | None:
    title = overrides.get("sd_model_checkpoint")
    return checkpoint_name(title) if isinstance(title, str) and title.strip() else None


def _image_fields(request: A1111Request, limits: UploadLimits) -> dict[str, Any]:
    """img2img or inpainting; width/height given: the image (and mask) are scaled to them, as A1111 does."""
    assert request.init_images
    fields: dict[str, Any] = {
        "image": request.init_images[0],
        "mode": "img2img",
        "strength": request.denoising_strength if request.denoising_strength is not None else 0.75,
    }
    if request.mask:
        fields["mode"] = "inpaint"
        fields["mask"] = _inverted(request.mask, limits) if request.inpainting_mask_invert else request.mask
    if request.width is not None or request.height is not None:
        fields["resize"] = True
    return fields


def _inverted(mask: str, limits: UploadLimits) -> str:
    """``inpainting_mask_invert: 1``: A1111 then repaints the black part; diffq repaints white."""
    data = decode_base64(mask, "mask", limits)
    try:
        with Image.open(io.BytesIO(data)) as image:
            inverted = ImageOps.invert(image.convert("L"))
    except (OSError, ValueError):
        raise InvalidRequestError(
            [FieldProblem("mask", "is not a readable image (accepted: PNG, JPEG, WebP)")]
        ) from None
    buffer = io.BytesIO()
    inverted.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def sampler_label(scheduler: str) -> str:
    """The A1111 name of a diffq scheduler (the diffq name where the table has none)."""
    return next((sampler.name for sampler in SAMPLERS if sampler.scheduler == scheduler), scheduler)


def info(record: JobRecord, request: A1111Request, version: str) -> str:
    """A1111's ``info``: a JSON string of what was generated, with every image's seed."""
    params = record.request
    seeds = [image.seed for image in record.images] or list(record.seeds)
    seed = seeds[0] if seeds else -1
    sampler = sampler_label(params.scheduler)
    size = f"{params.width}x{params.height}"
    texts = [
        _infotext(
            params.prompt,
            params.negative_prompt,
            params.steps,
            sampler,
            params.guidance_scale,
            s,
            size,
            record.model,
            version,
        )
        for s in seeds
    ]
    body = {
        "prompt": params.prompt,
        "all_prompts": [params.prompt] * len(seeds),
        "negative_prompt": params.negative_prompt,
        "all_negative_prompts": [params.negative_prompt] * len(seeds),
        "seed": seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0,
        "width": params.width,
        "height": params.height,
        "sampler_name": sampler,
        "scheduler": "Automatic",
        "cfg_scale": params.guidance_scale,
        "steps": params.steps,
        "batch_size": request.batch_size,
        "n_iter": request.n_iter,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": record.model,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": params.strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": record.created_at.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"diffq {version}",
        "diffq_job_id": record.id,
        "diffq_warnings": record.warnings,
    }
    return json.dumps(body)


def _infotext(
    prompt: str, negative: str, steps: int, sampler: str, cfg: float, seed: int, size: str, model: str, version: str
) -> str:
    """A1111's one-image parameter text (what it writes into PNGs and ``infotexts``)."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(
        f"Steps: {steps}, Sampler: {sampler}, Schedule type: Automatic, CFG scale: {cfg:g}, Seed: {seed}, "
        f"Size: {size}, Model: {model}, Version: diffq {version}"
    )
    return "\n".join(lines)


def parameters(request: A1111Request, record: JobRecord) -> dict[str, Any]:
    """A1111's ``parameters``: the request as run, with the model's defaults filled in; input images left out
    unless ``include_init_images``."""
    params = record.request
    body = request.model_dump()
    body.update(
        steps=params.steps,
        cfg_scale=params.guidance_scale,
        width=params.width,
        height=params.height,
        sampler_name=sampler_label(params.scheduler),
        seed=record.seeds[0] if record.seeds else request.seed,
    )
    if not request.include_init_images:
        body.update(init_images=None, mask=None)
    return body
