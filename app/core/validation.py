"""Checks a request against its model's registered limits and resolves its defaults.

Settings limits are already enforced by ``JobCreate``'s fields; what remains
depends on the model a worker registered: sizes, steps (and a scheduler's own
cap), schedulers, the negative prompt. The rules are ``diffq.app.contract.rules``,
the same the worker's engine checks by, so whatever it would refuse is refused
here, at submit. Every problem is reported at once, each naming the field and
what is accepted; nothing is silently corrected.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from operator import attrgetter

from diffq.app.contract.adapters import AdapterInfo
from diffq.app.contract.records import JobMode, JobParams, ModelRecord, utcnow
from diffq.app.contract.rules import (
    DEFAULT_STRENGTH,
    MAX_SEED,
    max_steps_for,
    negative_prompt_problem,
    strength_for,
    strength_problem,
)
from diffq.app.core.errors import FieldProblem, InvalidRequestError
from diffq.app.core.inputs import PreparedInputs
from diffq.app.core.loras import resolve_loras
from diffq.app.schemas.jobs import JobCreate

__all__ = ["DEFAULT_STRENGTH", "check_before_decode", "resolve_request", "respecified"]


def check_before_decode(body: JobCreate, model: ModelRecord, mode: JobMode) -> tuple[int, int] | None:
    """Every check that needs no input pixels (steps, images, scheduler, strength × steps, and the
    size where it is known before decoding: text-to-image or ``resize``), so a request that would be
    refused anyway never costs a decode. Returns that size, or None (it comes from the image)."""
    size = None
    if mode is JobMode.TXT2IMG or body.resize:
        size = (body.width or model.default_width, body.height or model.default_height)
    problems = _parameter_problems(body, model, mode)
    if size is not None:
        problems = [*_size_problems("width", size[0], model), *_size_problems("height", size[1], model), *problems]
    if problems:
        raise InvalidRequestError(problems)
    return size


def resolve_request(
    body: JobCreate, model: ModelRecord, inputs: PreparedInputs | None = None, adapters: Sequence[AdapterInfo] = ()
) -> JobParams:
    """The request as it will run: model defaults filled in, a seed chosen if none was given.

    ``inputs`` (from ``diffq.app.core.inputs.prepare_inputs``) gives an editing job's
    mode, input images and output size; without it the request is text-to-image.
    ``adapters`` are the LoRA adapters on offer (``diffq.app.contract.adapters.list_adapters``).
    """
    inputs = inputs or PreparedInputs(mode=JobMode.TXT2IMG)
    if inputs.size is not None:
        width, height = inputs.size
    else:
        width = body.width if body.width is not None else model.default_width
        height = body.height if body.height is not None else model.default_height
    steps = body.steps if body.steps is not None else model.default_steps
    scheduler = body.scheduler if body.scheduler is not None else model.default_scheduler

    problems = [
        *_size_problems("width", width, model),
        *_size_problems("height", height, model),
        *_parameter_problems(body, model, inputs.mode),
    ]
    strength = strength_for(inputs.mode, body.strength)
    prompt, loras, lora_problems = resolve_loras(body.prompt, body.loras, model, adapters)
    problems += lora_problems
    if problems:
        raise InvalidRequestError(problems)

    return JobParams(
        prompt=prompt,
        loras=loras,
        negative_prompt=body.negative_prompt,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=body.guidance_scale if body.guidance_scale is not None else model.default_guidance_scale,
        scheduler=scheduler,
        seed=chosen_seed(body.seed),
        num_images=body.num_images,
        metadata=body.metadata,
        mode=inputs.mode,
        strength=strength,
        outpaint=body.outpaint if inputs.mode is JobMode.OUTPAINT else None,
        image=inputs.image,
        mask=inputs.mask,
        journey=body.journey,
        output_format=body.output_format,
        quality=body.quality,
        deadline_at=deadline_at(body),
    )


def respecified(request: JobParams, was: JobCreate, body: JobCreate) -> JobParams | None:
    """``resolve_request``'s answer for ``body`` made from its answer ``request`` for ``was``, when
    the two bodies differ at most in prompt and seed (a batch's rows) and neither prompt holds a
    ``<lora:…>`` tag: nothing else depends on those two, so nothing needs checking again. None
    otherwise (then resolve ``body`` itself)."""
    if "<lora:" in was.prompt or "<lora:" in body.prompt or _shape(was) != _shape(body):
        return None
    update = {"prompt": body.prompt, "seed": chosen_seed(body.seed), "deadline_at": deadline_at(body)}
    return request.model_copy(update=update)


#: A body's fields but prompt and seed, as a tuple (every ``PROMPT_TAG`` begins "<lora:").
_shape = attrgetter(*(name for name in JobCreate.model_fields if name not in ("prompt", "seed")))


def chosen_seed(seed: int | None) -> int:
    """The seed asked for, else a random one (leaving room for ``seed + k`` of image k)."""
    return seed if seed is not None else secrets.randbelow(MAX_SEED - 1024)


def deadline_at(body: JobCreate) -> datetime | None:
    return utcnow() + timedelta(seconds=body.deadline_seconds) if body.deadline_seconds else None


def _parameter_problems(body: JobCreate, model: ModelRecord, mode: JobMode) -> list[FieldProblem]:
    """Problems of the fields that do not depend on the input image."""
    steps = body.steps if body.steps is not None else model.default_steps
    scheduler = body.scheduler if body.scheduler is not None else model.default_scheduler
    problems = []
    most = max_steps_for(scheduler, model.max_steps, model.scheduler_max_steps)
    if steps > model.max_steps:
        problems.append(_range_problem("steps", steps, model.max_steps, model))
    elif steps > most:
        problems.append(
            FieldProblem(
                "steps",
                f"must be between 1 and {most} for model {model.name!r} with scheduler {scheduler!r}; got {steps}",
            )
        )
    if problem := negative_prompt_problem(body.negative_prompt, model.negative_prompt, model.pipeline_class):
        problems.append(FieldProblem("negative_prompt", problem))
    if body.num_images > model.max_images:
        problems.append(_range_problem("num_images", body.num_images, model.max_images, model))
    if scheduler not in model.schedulers:
        accepted = ", ".join(model.schedulers)
        problems.append(FieldProblem("scheduler", f"must be one of: {accepted}; got {scheduler!r}"))
    strength = strength_for(mode, body.strength)
    if strength is not None and (problem := strength_problem(strength, steps)) is not None:
        problems.append(FieldProblem("strength", problem))
    return problems


def _size_problems(field: str, value: int, model: ModelRecord) -> list[FieldProblem]:
    lo, hi, multiple = model.min_size, model.max_size, model.size_multiple
    if lo <= value <= hi and value % multiple == 0:
        return []
    accepted = f"a multiple of {multiple} between {lo} and {hi}"
    return [FieldProblem(field, f"must be {accepted} for model {model.name!r}; got {value}")]


def _range_problem(field: str, value: int, most: int, model: ModelRecord) -> FieldProblem:
    return FieldProblem(field, f"must be between 1 and {most} for model {model.name!r}; got {value}")
