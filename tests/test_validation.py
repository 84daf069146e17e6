"""app/core/validation.py: model limits checked up front, defaults resolved, nothing silently fixed."""

from __future__ import annotations

import pytest

from diffq.app.contract.records import ModelRecord
from diffq.app.core.errors import InvalidRequestError
from diffq.app.core.validation import resolve_request
from diffq.app.schemas.jobs import JobCreate

MODEL = ModelRecord(
    name="shapes", pipeline_class="StableDiffusionPipeline", weights_hash="0" * 64, device="cpu", dtype="float32",
    default_width=64, default_height=64, min_size=32, max_size=128, size_multiple=8, default_steps=20, max_steps=50,
    default_guidance_scale=5.0, default_scheduler="ddim", schedulers=["ddim", "euler"], max_images=2,
)


def test_defaults_come_from_the_model() -> None:
    params = resolve_request(JobCreate(prompt="a red circle", seed=3), MODEL)
    assert (params.width, params.height, params.steps, params.guidance_scale, params.scheduler, params.seed) == (
        64, 64, 20, 5.0, "ddim", 3,
    )


def test_a_seed_is_drawn_when_none_is_given() -> None:
    seeds = {resolve_request(JobCreate(prompt="p"), MODEL).seed for _ in range(5)}
    assert len(seeds) > 1


def test_each_problem_names_its_field_and_what_is_accepted() -> None:
    body = JobCreate(prompt="p", width=44, height=136, steps=51, scheduler="pndm", num_images=3)
    with pytest.raises(InvalidRequestError) as error:
        resolve_request(body, MODEL)
    problems = {p.field: p.message for p in error.value.problems}
    assert problems == {
        "width": "must be a multiple of 8 between 32 and 128 for model 'shapes'; got 44",
        "height": "must be a multiple of 8 between 32 and 128 for model 'shapes'; got 136",
        "steps": "must be between 1 and 50 for model 'shapes'; got 51",
        "num_images": "must be between 1 and 2 for model 'shapes'; got 3",
        "scheduler": "must be one of: ddim, euler; got 'pndm'",
    }


def test_the_models_published_step_cap_and_negative_prompt_are_checked() -> None:
    lcm = MODEL.model_copy(update={"schedulers": ["ddim", "lcm"], "scheduler_max_steps": {"lcm": 8},
                                   "negative_prompt": False, "pipeline_class": "LatentConsistencyModelPipeline"})
    assert resolve_request(JobCreate(prompt="p", steps=8, scheduler="lcm"), lcm).steps == 8
    assert resolve_request(JobCreate(prompt="p", steps=50, scheduler="ddim"), lcm).steps == 50
    with pytest.raises(InvalidRequestError) as error:
        resolve_request(JobCreate(prompt="p", steps=9, scheduler="lcm", negative_prompt="blurry"), lcm)
    assert {p.field: p.message for p in error.value.problems} == {
        "steps": "must be between 1 and 8 for model 'shapes' with scheduler 'lcm'; got 9",
        "negative_prompt": "LatentConsistencyModelPipeline takes no negative prompt; send an empty string",
    }
