"""Request rules: the one place the API and the engine take their defaults, limits and modes from.

The API checks a request here at submit (``diffq.app.core.validation``, ``diffq.app.core.inputs``, and through
them the OpenAI and A1111 endpoints and batches); the worker's engine checks the same request here
again before it runs (``diffq.model.engine.Engine.validate``). What depends on the model (sizes, step caps
per scheduler, schedulers, modes, whether it takes a negative prompt) is not written here: the
worker publishes it in the model's record (``records.ModelRecord``, from ``diffq.model.engine.ModelInfo``)
and the rules below read it from there, so the API refuses at submit whatever the engine would.

Only the standard library and pydantic: the API imports it without torch, and the engine without
the API's modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

#: Largest seed a request may give. Image k of a request uses ``seed + k``. 32 bits: every seed
#: the API has ever accepted or chosen, and what A1111 clients, NumPy's legacy generator and a
#: JavaScript number all hold exactly; torch's 64-bit seed takes ``seed + k`` with room to spare.
MAX_SEED = 2**32 - 1
#: Classifier-free guidance scales a request may give: 0 (off) to 50.
MIN_GUIDANCE_SCALE = 0.0
MAX_GUIDANCE_SCALE = 50.0
#: Most pixels outpainting may add on one side (the model's size limits apply to the result too).
MAX_OUTPAINT = 4096


class JobMode(str, Enum):
    """What a job does with its input image (the engine calls it ``diffq.model.editing.Mode``)."""

    TXT2IMG = "txt2img"  # no input image
    IMG2IMG = "img2img"  # image + strength
    INPAINT = "inpaint"  # image + mask (white = repaint)
    OUTPAINT = "outpaint"  # image + pixels to add on each side

    @property
    def takes_image(self) -> bool:
        return self is not JobMode.TXT2IMG


EDITING_MODES = (JobMode.IMG2IMG, JobMode.INPAINT, JobMode.OUTPAINT)

#: Mode-specific fields and the modes that use them: present in any other mode is an error, and
#: missing in one of these too (except strength, which has a default per mode).
USED_BY: Mapping[str, tuple[JobMode, ...]] = {
    "image": EDITING_MODES,
    "strength": EDITING_MODES,
    "mask": (JobMode.INPAINT,),
    "outpaint": (JobMode.OUTPAINT,),
}

#: Strength an editing mode uses when the request gives none: img2img keeps the input's layout,
#: the others repaint fully.
DEFAULT_STRENGTH: Mapping[JobMode, float] = {JobMode.IMG2IMG: 0.75, JobMode.INPAINT: 1.0, JobMode.OUTPAINT: 1.0}


class Outpaint(BaseModel):
    """Pixels added on each side of the input image (the engine calls it ``diffq.model.editing.Padding``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    left: int = Field(0, ge=0, le=MAX_OUTPAINT)
    top: int = Field(0, ge=0, le=MAX_OUTPAINT)
    right: int = Field(0, ge=0, le=MAX_OUTPAINT)
    bottom: int = Field(0, ge=0, le=MAX_OUTPAINT)

    def canvas_size(self, width: int, height: int) -> tuple[int, int]:
        return width + self.left + self.right, height + self.top + self.bottom

    @property
    def is_empty(self) -> bool:
        return not (self.left or self.top or self.right or self.bottom)


def strength_for(mode: JobMode, strength: float | None) -> float | None:
    """The strength a request runs with: None for text-to-image, else the given one or the mode's default."""
    if not mode.takes_image:
        return None
    return DEFAULT_STRENGTH[mode] if strength is None else strength


def denoising_steps(steps: int, strength: float | None) -> int:
    """Steps a job runs: all of them for text-to-image, ``int(steps × strength)`` for an editing job
    (diffusers' img2img and inpaint pipelines skip the first ones: the input stands in for them)."""
    return steps if strength is None else int(steps * strength)


def strength_problem(strength: float, steps: int) -> str | None:
    """At least one denoising step must remain of an editing job (see ``denoising_steps``)."""
    if denoising_steps(steps, strength) >= 1:
        return None
    return f"{strength} × {steps} steps leaves no denoising step; raise strength or steps"


def max_steps_for(scheduler: str, max_steps: int, scheduler_max_steps: Mapping[str, int]) -> int:
    """The most steps a model takes with ``scheduler``: its own cap, or lower where the scheduler
    has one (an LCM model samples from the ``original_inference_steps`` timesteps it was distilled on)."""
    return min(max_steps, scheduler_max_steps.get(scheduler, max_steps))


def negative_prompt_problem(negative_prompt: str, takes_negative_prompt: bool, pipeline_class: str) -> str | None:
    """A pipeline without classifier-free guidance (e.g. an LCM one) has no negative prompt to take."""
    if not negative_prompt or takes_negative_prompt:
        return None
    return f"{pipeline_class} takes no negative prompt; send an empty string"
